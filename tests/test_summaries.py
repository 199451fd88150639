"""research.framework.summaries: model summaries against Keras' own counts,
confusion matrices against scikit-learn, HParams sessions read back as
TensorBoard reads them."""

import json
import os
import re
import sys

import keras
import numpy as np
import pytest
from sklearn import metrics as sklearn_metrics
import tensorflow as tf
from tensorboard import context as tensorboard_context
from tensorboard.backend.event_processing import (
    data_provider, event_accumulator, plugin_event_multiplexer)
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import (api_pb2, backend_context,
                                         list_session_groups)
from tensorboard.plugins.hparams import metadata as hparams_metadata

import layers
import training_loops
from research.framework import models, summaries


def _mlp(dtype=None):
  """4 -> Dense(3) -> BatchNormalization -> Dense(2): 15 + (6 trainable,
  6 moving statistics) + 8 parameters."""
  inputs = keras.Input((4,), name="features")
  x = layers.Dense(3, "relu", name="hidden", dtype=dtype)(inputs)
  x = layers.BatchNormalization(name="norm", dtype=dtype)(x)
  return keras.Model(inputs, layers.Dense(2, name="out", dtype=dtype)(x))


def _sequential():
  model = keras.Sequential([layers.Dense(3, "relu"),
                            layers.BatchNormalization(), layers.Dense(2)])
  model(np.zeros((2, 4), np.float32))  # builds with the data's batch size
  return model


class _Halves(keras.layers.Layer):
  """A layer of two outputs: the first feature and the rest."""

  def call(self, inputs):
    return inputs[:, :1], inputs[:, 1:]


def _shared_and_two_outputs():
  inputs = keras.Input((4,))
  shared = layers.Dense(4, name="shared")
  first, rest = _Halves(name="halves")(shared(shared(inputs)))
  return keras.Model(inputs, [first, rest])


def _x(examples=16, features=8):
  return np.random.default_rng(0).normal(size=(examples, features)).astype(
      "float32")


MODELS = {
    "mlp": _mlp,
    "mlp_mixed_float16": lambda: _mlp("mixed_float16"),
    "sequential": _sequential,
    "shared_and_two_outputs": _shared_and_two_outputs,
    "mlp_classifier": lambda: models.mlp_classifier(
        _x().reshape(16, 2, 4), 3, hidden=(5,)),
    "deep_classifier_dropout": lambda: models.deep_classifier(
        _x(), 3, batchnorm=True, dropout="standard", depth=2, units=3,
        seed=1),
    "regressor": lambda: models.regressor(_x(), 2, 5),
    "wide_deep_multi_input": lambda: models.wide_deep_multi_input(_x(), 3),
    "wide_deep_two_outputs": lambda: models.wide_deep_multi_input(
        _x(), 3, aux_output=True),
    "wide_deep_subclassed": lambda: models.wide_deep_subclassed(_x(), 3),
}


def _keras_printed_counts(model):
  lines = []
  model.summary(print_fn=lambda text, line_break=None: lines.append(text))
  text = "\n".join(lines)
  return tuple(int(re.search(rf"\b{kind} params: ([\d,]+)", text).group(1)
                   .replace(",", ""))
               for kind in ("Trainable", "Non-trainable"))


@pytest.mark.parametrize("name", MODELS)
def test_model_summary_counts_as_keras_does(name):
  model = MODELS[name]()
  summary = summaries.model_summary(model)
  json.dumps(summary)  # results.json takes it as it is
  trainable = summary["trainable_parameters"]
  non_trainable = summary["non_trainable_parameters"]
  assert (trainable, non_trainable) == _keras_printed_counts(model)
  assert trainable + non_trainable == model.count_params()
  assert trainable == sum(np.prod(w.shape) for w in model.trainable_weights)
  assert non_trainable == sum(np.prod(w.shape)
                              for w in model.non_trainable_weights)
  assert [row["name"] for row in summary["layers"]] == [
      layer.name for layer in model.layers]
  assert [row["parameters"] for row in summary["layers"]] == [
      layer.count_params() for layer in model.layers]


@pytest.mark.parametrize("dtype", [None, "mixed_float16"])
def test_model_summary_of_a_known_model(dtype):
  assert summaries.model_summary(_mlp(dtype)) == {
      "trainable_parameters": 15 + 6 + 8, "non_trainable_parameters": 6,
      "layers": [
          {"name": "features", "type": "InputLayer",
           "output_shape": [None, 4], "parameters": 0},
          {"name": "hidden", "type": "Dense", "output_shape": [None, 3],
           "parameters": 15},
          {"name": "norm", "type": "BatchNormalization",
           "output_shape": [None, 3], "parameters": 12},
          {"name": "out", "type": "Dense", "output_shape": [None, 2],
           "parameters": 8}]}


def test_model_summary_shapes_of_sequential_shared_and_multi_output_layers():
  sequential = summaries.model_summary(_sequential())["layers"]
  assert [row["output_shape"] for row in sequential] == [
      [None, 3], [None, 3], [None, 2]]
  shared = summaries.model_summary(_shared_and_two_outputs())
  assert [(row["name"], row["output_shape"], row["parameters"])
          for row in shared["layers"][1:]] == [
              ("shared", [None, 4], 20),
              ("halves", [[None, 1], [None, 3]], 0)]
  assert shared["trainable_parameters"] == 20  # one Dense, called twice


def test_model_summary_of_wide_and_deep_models():
  two_inputs = summaries.model_summary(
      models.wide_deep_multi_input(_x(), 3, aux_output=True))
  shapes = {row["name"]: row["output_shape"] for row in two_inputs["layers"]}
  assert (shapes["wide"], shapes["deep"]) == ([None, 5], [None, 6])
  assert shapes["main"] == shapes["aux"] == [None, 1]
  (merge,) = [row for row in two_inputs["layers"]
              if row["type"] == "WideDeepMerge"]
  assert merge["output_shape"] == [None, 5 + 3]
  # A subclassed model's layers run eagerly: no symbolic output to read.
  subclassed = summaries.model_summary(models.wide_deep_subclassed(_x(), 3))
  assert {row["output_shape"] for row in subclassed["layers"]} == {None}


def _classifier(dropout_rate=0.0):
  """Dict inputs `{"a": [3], "b": [2]}` -> 4 class probabilities."""
  inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((2,),
                                                               name="b")}
  x = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
  x = layers.Dropout(dropout_rate, seed=0)(layers.Dense(8, "relu")(x))
  return keras.Model(inputs, layers.Dense(4, "softmax")(x))


def _classification_data(examples=50):
  rng = np.random.default_rng(1)
  x = {"a": rng.normal(size=(examples, 3)).astype("float32"),
       "b": rng.normal(size=(examples, 2)).astype("float32")}
  return x, rng.integers(0, 4, size=examples)


def _sklearn_matrix(model, x, y):
  predicted = np.argmax(model(x, training=False).numpy(), axis=-1)
  return sklearn_metrics.confusion_matrix(y, predicted,
                                          labels=range(4)).tolist()


@pytest.mark.parametrize("label_shape", ["[batch]", "[batch, 1]"])
def test_confusion_matrix_matches_scikit_learn(label_shape):
  keras.utils.set_random_seed(0)
  model = _classifier(dropout_rate=0.5)  # training=False: no dropout
  x, y = _classification_data()
  labels = y if label_shape == "[batch]" else y[:, None]
  data = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16)  # 16+2
  matrix = summaries.confusion_matrix(model, data, 4)
  assert matrix == _sklearn_matrix(model, x, y)
  assert all(type(count) is int for row in matrix for count in row)


def test_confusion_matrix_of_a_model_built_under_a_strategy(mirrored):
  keras.utils.set_random_seed(0)
  with mirrored.scope():
    model = _classifier()
  x, y = _classification_data()
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
  assert summaries.confusion_matrix(model, data, 4) == _sklearn_matrix(
      model, x, y)


@pytest.mark.parametrize("classes", [3, 25])  # counts in the cells, or not
def test_plot_confusion_matrix_writes_a_png(tmp_path, classes):
  matrix = np.random.default_rng(0).integers(0, 50, (classes, classes))
  path = tmp_path / "confusion_matrix_graph.png"
  summaries.plot_confusion_matrix(matrix.tolist(), path, "classify: graph")
  with open(path, "rb") as stream:
    assert stream.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(tmp_path) == [path.name]  # no temporary left


def test_plot_confusion_matrix_is_skipped_without_matplotlib(tmp_path,
                                                             monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
  summaries.plot_confusion_matrix([[1, 0], [0, 1]], tmp_path / "cm.png", "t")
  assert not os.listdir(tmp_path)


def test_log_hparams_writes_a_session_tensorboard_reads(tmp_path):
  hparams = {"learning_rate": 0.01, "epochs": 3, "seed": np.int64(7),
             "loop": "graph", "jit_compile": False, "export_dir": None,
             "hidden": [300, 100]}
  metrics = {"val_loss": 0.25, "test_accuracy": np.float32(0.75)}
  summaries.log_hparams(str(tmp_path / "graph"), hparams, metrics)
  accumulator = event_accumulator.EventAccumulator(
      str(tmp_path / "graph"), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  content = accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
  session = hparams_metadata.parse_session_start_info_plugin_data(
      content[hparams_metadata.SESSION_START_INFO_TAG])
  values = {name: getattr(value, value.WhichOneof("kind"))
            for name, value in session.hparams.items()}
  assert values == {"learning_rate": 0.01, "epochs": 3.0, "seed": 7.0,
                    "loop": "graph", "jit_compile": False,
                    "export_dir": "None", "hidden": "[300, 100]"}
  scalars = {}
  for name in metrics:
    (event,) = accumulator.Tensors(name)
    scalars[name] = (event.step, tf.make_ndarray(event.tensor_proto).item())
  assert scalars == {"val_loss": (0, 0.25), "test_accuracy": (0, 0.75)}



def test_log_hparams_that_cannot_be_written_is_a_write_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(training_loops.WriteError,
                     match=f"^Could not write {blocker}/graph: Not a "
                           r"directory\.$"):
    summaries.log_hparams(str(blocker / "graph"), {"loop": "graph"},
                          {"val_loss": 0.25})

def test_sessions_under_one_logdir_compare_in_the_hparams_plugin(tmp_path):
  for loop, val_loss in (("eager", 0.5), ("graph", 0.25)):
    summaries.log_hparams(str(tmp_path / loop),
                        {"loop": loop, "export_dir": None},
                        {"val_loss": val_loss})
  # What the HParams tab's session table asks TensorBoard's backend for.
  multiplexer = plugin_event_multiplexer.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(str(tmp_path))
  multiplexer.Reload()
  backend = backend_context.Context(base_plugin.TBContext(
      logdir=str(tmp_path), multiplexer=multiplexer,
      data_provider=data_provider.MultiplexerDataProvider(
          multiplexer, str(tmp_path))))
  response = list_session_groups.Handler(
      tensorboard_context.RequestContext(), backend, "",
      api_pb2.ListSessionGroupsRequest(
          start_index=0, slice_size=10,
          allowed_statuses=[api_pb2.STATUS_UNKNOWN])).run()
  rows = sorted(
      (group.hparams["loop"].string_value,
       group.hparams["export_dir"].string_value,
       [(metric.name.tag, metric.value) for metric in group.metric_values])
      for group in response.session_groups)
  assert rows == [("eager", "None", [("val_loss", 0.5)]),
                  ("graph", "None", [("val_loss", 0.25)])]
