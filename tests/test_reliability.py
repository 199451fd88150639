"""Bad input gets a clear error; interrupted writes and runs lose nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import layers
import losses
import training_loops
from loop_models import classification_data, classifier, sgd
from research import experiment
from training_loops.atomic import write_json_atomically

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(model_fn=classifier, data=None, loop="graph", **kwargs):
  return training_loops.train(
      model_fn, sgd(), kwargs.pop("loss", losses.SparseCategoricalCrossentropy()),
      data if data is not None else classification_data(), loop=loop,
      verbose=0, seed=1, **kwargs)


# -------------------------------------------------------------- bad input


def test_checkpoint_of_another_model_is_named_not_half_restored(tmp_path):
  _train(checkpoint_dir=tmp_path)
  wider = lambda: keras.Sequential([keras.Input((4,)), layers.Dense(9, "relu"),
                                    layers.Dense(3, "softmax")])
  with pytest.raises(training_loops.CheckpointMismatchError,
                     match=r"different model \(.*\[4, 8\] float32 saved, "
                           r"\[4, 9\] float32 now"):
    _train(wider, checkpoint_dir=tmp_path, epochs=2)


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


# --------------------------------------------------------- atomic writes


class _Unserializable:
  pass


def test_interrupted_json_write_leaves_the_previous_file(tmp_path):
  path = tmp_path / "results.json"
  write_json_atomically(path, {"epoch": 1})
  with pytest.raises(TypeError):  # json.dump fails halfway through
    write_json_atomically(path, {"epoch": 2, "model": _Unserializable()})
  assert json.loads(path.read_text()) == {"epoch": 1}
  assert os.listdir(tmp_path) == ["results.json"]


def test_interrupted_export_leaves_the_previous_export(tmp_path):
  model = classifier(batch_norm=False)
  target = str(tmp_path / "export")
  experiment.export(model, target)
  before = sorted(os.listdir(target))

  def crash_midway(path, **kwargs):
    os.makedirs(path)
    (open(os.path.join(path, "saved_model.pb"), "wb")).write(b"partial")
    raise KeyboardInterrupt

  model.export = crash_midway
  with pytest.raises(KeyboardInterrupt):
    experiment.export(model, target)
  assert sorted(os.listdir(target)) == before
  reloaded = tf.saved_model.load(target)
  assert reloaded.serve(tf.zeros([2, 4])).shape == (2, 3)


# ----------------------------------------------------------- kill -9


def _script(output_dir, epochs=4):
  return [sys.executable, "-m", "research.classify", "--loop=eager",
          f"--epochs={epochs}", "--verbose=0", f"--output_dir={output_dir}"]


def _comparable(results):
  """results.json without what a rerun legitimately changes: timings."""
  for report in results["loops"].values():
    report.pop("steps_per_second"), report.pop("wall_seconds")
  results["flags"].pop("output_dir")
  return results


def _assert_same(actual, expected, where="results"):
  """Equal structure and strings; numbers equal to float32 rounding."""
  if isinstance(expected, dict):
    assert sorted(actual) == sorted(expected), where
    for key in expected:
      _assert_same(actual[key], expected[key], f"{where}.{key}")
  elif isinstance(expected, list):
    assert len(actual) == len(expected), where
    for index, (a, e) in enumerate(zip(actual, expected)):
      _assert_same(a, e, f"{where}[{index}]")
  elif isinstance(expected, float):
    np.testing.assert_allclose(actual, expected, rtol=1e-6, err_msg=where)
  else:
    assert actual == expected, where


def test_sigkill_mid_epoch_then_rerun_equals_an_uninterrupted_run(tmp_path):
  killed, uninterrupted = tmp_path / "killed", tmp_path / "whole"
  process = subprocess.Popen(_script(killed), cwd=REPO,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  second = killed / "checkpoints" / "eager" / "ckpt-2.index"
  deadline = time.monotonic() + 120
  while not second.exists() and process.poll() is None:
    assert time.monotonic() < deadline, "no checkpoint within 120 s"
    time.sleep(0.05)
  time.sleep(0.5)  # into epoch 3 (an eager epoch takes seconds)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=30)
  assert not (killed / "results.json").exists()
  for output_dir in (killed, uninterrupted):
    subprocess.run(_script(output_dir), cwd=REPO, check=True, timeout=300,
                   capture_output=True)
  results = [_comparable(json.loads((d / "results.json").read_text()))
             for d in (killed, uninterrupted)]
  _assert_same(results[0], results[1])
  final = [tf.train.load_checkpoint(str(d / "checkpoints" / "eager"))
           for d in (killed, uninterrupted)]
  names = [n for n, _ in tf.train.list_variables(
      str(uninterrupted / "checkpoints" / "eager")) if "model_variables" in n]
  assert names
  for name in names:
    np.testing.assert_allclose(final[0].get_tensor(name),
                               final[1].get_tensor(name), rtol=1e-6,
                               atol=1e-7)
