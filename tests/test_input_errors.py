"""Bad input to `train` is one clear error naming the problem, before or
instead of a TensorFlow traceback."""

import keras
import pytest
import tensorflow as tf

import losses
import training_loops
from loop_models import (classification_data, classifier, run_loop,
                         two_regressions)


def _train(loop="graph", **kwargs):
  """The plain classifier, unweighted data, no metrics, seed 1."""
  kwargs.setdefault("model_fn", classifier)
  kwargs.setdefault("data", classification_data())
  kwargs.setdefault("metrics", [])
  return run_loop(loop, epochs=kwargs.pop("epochs", 1), seed=1, **kwargs)


def test_empty_dataset_is_refused():
  empty = classification_data().take(0)
  with pytest.raises(ValueError, match="train_data is empty"):
    _train(data=empty)


def test_model_that_does_not_fit_the_inputs_names_both_shapes():
  with pytest.raises(ValueError, match=r"does not accept the data's inputs "
                                       r"\(None, 5\)"):
    _train(data=classification_data(features=5))


def test_model_outputs_that_do_not_fit_the_targets_name_both_shapes():
  one_hot = classification_data().map(lambda x, y: (x, tf.one_hot(y, 4)))
  with pytest.raises(ValueError, match=r"outputs \(1, 3\) do not fit the "
                                       r"data's targets \(None, 4\)"):
    _train(data=one_hot, loss=losses.CategoricalCrossentropy())


@pytest.mark.parametrize("loop", training_loops.LOOPS)
def test_labels_outside_the_classes_are_a_clear_error(loop):
  bad = classification_data().map(lambda x, y: (x, y + 2))  # labels 2..4
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    _train(data=bad, loop=loop)


def test_a_loss_reduction_the_loops_would_replace_is_refused():
  with pytest.raises(ValueError, match=r"reduction='sum'\) is not "
                                       "supported.*'sum_over_batch_size'"):
    _train(loss=losses.SparseCategoricalCrossentropy(reduction="sum"))


# Two outputs with losses, sample weights for "a" only.
_TWO_LOSSES = {"a": losses.MeanSquaredError(), "b": losses.MeanSquaredError()}


def _weights_for_a_only():
  return tf.data.Dataset.from_tensor_slices(
      (tf.zeros([8, 4]), {"a": tf.zeros([8, 1]), "b": tf.zeros([8, 1])},
       {"a": tf.ones([8])})).batch(4)


def test_per_output_sample_weights_must_name_every_output():
  with pytest.raises(ValueError, match=r"train_data's sample weights are "
                                       r"per output \(\['a'\]\) but miss "
                                       r"\['b'\]"):
    _train(model_fn=two_regressions, data=_weights_for_a_only(),
           loss=_TWO_LOSSES, metrics={})


def test_targets_stacked_into_one_tensor_are_refused_for_two_losses():
  """tf.data turns a Python list of targets into one stacked tensor, which
  the losses would otherwise index (or broadcast) silently."""
  stacked = _weights_for_a_only().map(
      lambda x, y, w: (x, [y["a"], y["b"]]))
  with pytest.raises(ValueError, match=r"train_data's targets are one tensor "
                                       r"of shape \(2, None, 1\), but the "
                                       r"losses are per output"):
    _train(model_fn=two_regressions, data=stacked, loss=_TWO_LOSSES,
           metrics={})


def test_evaluate_checks_per_output_sample_weights_too():
  with pytest.raises(ValueError, match=r"data's sample weights are per "
                                       r"output \(\['a'\]\) but miss"):
    training_loops.evaluate(two_regressions(), _TWO_LOSSES,
                            _weights_for_a_only())


def test_per_output_sample_weights_for_one_loss_are_refused():
  data = classification_data().map(lambda x, y: (x, y, {"a": tf.ones_like(
      y, tf.float32)}))
  with pytest.raises(ValueError, match="per output .* but the loss is one"):
    _train(data=data)


def test_a_metric_that_does_not_fit_the_outputs_names_both_shapes():
  with pytest.raises(ValueError,
                     match=r"Metric 'f1_score' does not fit the targets "
                           r"\(None,\) and outputs \(None, 3\)"):
    _train(metrics=[keras.metrics.F1Score()])


def test_a_metric_with_a_vector_result_is_refused():
  one_hot = classification_data().map(lambda x, y: (x, tf.one_hot(y, 3)))
  with pytest.raises(ValueError, match=r"Metric 'f1_score' gives a result "
                                       r"of shape \(3,\); the loops log one "
                                       r"number per metric"):
    _train(data=one_hot, loss=losses.CategoricalCrossentropy(),
           metrics=[keras.metrics.F1Score(average=None)])


def test_a_loss_dict_naming_an_output_the_model_lacks_is_refused():
  with pytest.raises(ValueError, match=r"The loss dict names outputs the "
                                       r"model does not have: \['wrong'\]"):
    _train(model_fn=two_regressions, data=_weights_for_a_only(),
           loss={"wrong": losses.MeanSquaredError()}, metrics={})


def test_two_metrics_under_one_name_are_refused():
  with pytest.raises(ValueError, match="Two metrics report as 'm'"):
    _train(metrics=[keras.metrics.SparseCategoricalAccuracy(name="m"),
                    keras.metrics.SparseTopKCategoricalAccuracy(name="m")])


def test_metrics_for_an_output_without_targets_are_refused():
  """One tensor of targets is the output's with the loss; fit drops the
  other output's metrics without a word."""
  one_target = _weights_for_a_only().map(lambda x, y, w: (x, y["a"]))
  with pytest.raises(ValueError, match=r"Metric 'b_mae' is for output 'b', "
                                       r"but the targets are one tensor"):
    _train(model_fn=two_regressions, data=one_target,
           loss={"a": losses.MeanSquaredError()},
           metrics={output: [keras.metrics.MeanAbsoluteError(name="mae")]
                    for output in "ab"})


class _TwoOutputsByPosition(keras.Model):
  """Subclassed, returning a list: its outputs have no names."""

  def __init__(self):
    super().__init__()
    self.a, self.b = keras.layers.Dense(1), keras.layers.Dense(1)

  def call(self, inputs):
    return [self.a(inputs), self.b(inputs)]


def test_losses_by_position_on_a_model_without_output_names_are_refused():
  """fit would name such a model's logs after its losses (two MSEs would
  share a name); a list-output model without names is refused in one
  line."""
  data = _weights_for_a_only().map(lambda x, y, w: (x, (y["a"], y["b"])))
  with pytest.raises(ValueError, match=r"^Losses or metrics per output "
                                       r"position need a model with output "
                                       r"names"):
    _train(model_fn=_TwoOutputsByPosition, data=data,
           loss=[losses.MeanSquaredError(), losses.MeanSquaredError()],
           metrics={})
