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
from loop_models import (assert_same_run, classification_data, classifier,
                         sgd, wait_for_epochs)
from research import experiment

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
  training_loops.write_json_atomically(path, {"epoch": 1})
  with pytest.raises(TypeError):  # json.dump fails halfway through
    training_loops.write_json_atomically(
        path, {"epoch": 2, "model": _Unserializable()})
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


def _write(path, kind, text, fail=False):
  """Writes `text` as a file, or as a directory of two files, failing
  after the first part if told to."""
  parts = [path] if kind == "file" else [os.path.join(path, "a"),
                                         os.path.join(path, "sub", "b")]
  for part in parts:
    os.makedirs(os.path.dirname(part), exist_ok=True)
    with open(part, "w", encoding="utf-8") as stream:
      stream.write(text)
    if fail:
      raise KeyboardInterrupt


def _read(path, kind):
  if kind == "file":
    return path.read_text()
  return {str(file.relative_to(path)): file.read_text()
          for file in path.rglob("*") if file.is_file()}


@pytest.mark.parametrize("kind,name", [("file", "best.weights.h5"),
                                       ("directory", "export")])
def test_replaced_atomically_swaps_in_whole_writes_only(tmp_path, kind, name):
  path = tmp_path / name
  _write(str(path), kind, "old")
  before = _read(path, kind)
  with pytest.raises(KeyboardInterrupt):
    with training_loops.replaced_atomically(path) as temporary:
      _write(temporary, kind, "new", fail=True)
  assert _read(path, kind) == before
  assert os.listdir(tmp_path) == [name]
  with training_loops.replaced_atomically(path) as temporary:
    # Beside the target, with its name ending (Keras checks `.weights.h5`).
    assert os.path.dirname(temporary) == str(tmp_path)
    assert temporary.endswith(name) and temporary != str(path)
    _write(temporary, kind, "new")
  assert _read(path, kind) == {
      "file": "new", "directory": {"a": "new", "sub/b": "new"}}[kind]
  assert os.listdir(tmp_path) == [name]


_CRASH_MIDWAY_THROUGH_A_DIRECTORY_SWAP = """
import os, sys
import training_loops

rename, renames_left = os.replace, int(sys.argv[2])
def rename_then_maybe_die(source, target):
  global renames_left
  rename(source, target)
  renames_left -= 1
  if not renames_left:
    os._exit(9)
os.replace = rename_then_maybe_die
with training_loops.replaced_atomically(sys.argv[1]) as temporary:
  print(temporary, flush=True)
  os.makedirs(temporary)
  with open(os.path.join(temporary, "a"), "w") as stream:
    stream.write("new")
"""


@pytest.mark.parametrize("renames,survivor", [
    (1, {"a": "old", "b": "old"}),  # old one aside, the new one not in yet
    (2, {"a": "new"})])  # the new one in, the old one not yet deleted
def test_a_directory_a_crash_left_aside_comes_back_or_goes(tmp_path, renames,
                                                           survivor):
  path = tmp_path / "export"
  path.mkdir()
  (path / "a").write_text("old")
  (path / "b").write_text("old")
  crashed = subprocess.run(
      [sys.executable, "-c", _CRASH_MIDWAY_THROUGH_A_DIRECTORY_SWAP,
       str(path), str(renames)], cwd=REPO, capture_output=True, text=True,
      timeout=120)
  assert crashed.returncode == 9, crashed.stderr
  temporary = os.path.basename(crashed.stdout.strip())
  with pytest.raises(KeyboardInterrupt):
    with training_loops.replaced_atomically(path) as writing:
      _write(writing, "directory", "newer", fail=True)
  assert _read(path, "directory") == survivor
  # Only a process killed before its rename leaves its temporary behind.
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["export"] + ([temporary] if renames == 1 else []))


# ----------------------------------------------------------- kill -9


def _script(output_dir, epochs=4):
  return [sys.executable, "-m", "research.classify", "--loop=eager",
          f"--epochs={epochs}", "--verbose=0", f"--output_dir={output_dir}"]


def _rerun_and_compare(resumed, uninterrupted):
  """Runs the script to the end in both output dirs (resuming the first);
  their results must agree."""
  for output_dir in (resumed, uninterrupted):
    subprocess.run(_script(output_dir), cwd=REPO, check=True, timeout=300,
                   capture_output=True)
  results = [_comparable(json.loads((d / "results.json").read_text()))
             for d in (resumed, uninterrupted)]
  _assert_same(results[0], results[1])


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
  wait_for_epochs(killed / "checkpoints" / "eager", 2, process)
  time.sleep(0.5)  # into epoch 3 (an eager epoch takes seconds)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=30)
  assert not (killed / "results.json").exists()
  _rerun_and_compare(killed, uninterrupted)
  final = [tf.train.load_checkpoint(str(d / "checkpoints" / "eager"))
           for d in (killed, uninterrupted)]
  names = [n for n, _ in tf.train.list_variables(
      str(uninterrupted / "checkpoints" / "eager")) if "model_variables" in n]
  assert names
  for name in names:
    np.testing.assert_allclose(final[0].get_tensor(name),
                               final[1].get_tensor(name), rtol=1e-6,
                               atol=1e-7)


# ------------------------------------------------------- SIGINT, SIGTERM


class _Switch:
  """A plain object: Keras would store a dict attribute as a tracked copy."""
  on = False


class _SignalAt(keras.layers.Layer):
  """The identity; on its `call_number`-th training call (counted at run
  time, also inside graphs) it sends `signal_number` to this process, once
  while `armed.on`."""

  def __init__(self, call_number, signal_number, armed, **kwargs):
    super().__init__(**kwargs)
    self.call_number, self.signal_number = call_number, signal_number
    self.armed, self.calls = armed, 0

  def _count(self):
    self.calls += 1
    if self.armed.on and self.calls == self.call_number:
      self.armed.on = False
      os.kill(os.getpid(), self.signal_number)
    return np.float32(0.0)

  def call(self, inputs, training=None):
    if not training:
      return inputs
    zero = tf.py_function(self._count, [], tf.float32)
    return inputs + tf.ensure_shape(zero, [])


@pytest.mark.parametrize("loop,where", [
    ("eager", (1, 2)), ("function", (1, 2)), ("graph", (1, 4)),
    ("keras_fit", (2, 0))])
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_where_it_stopped_and_the_rerun_continues_exactly(
    loop, where, signal_number, tmp_path):
  armed = _Switch()

  def model_fn():  # 4 steps an epoch: the 6th step is epoch 1, step 2
    return keras.Sequential([keras.Input((4,)),
                             _SignalAt(6, signal_number, armed),
                             layers.Dense(8, "relu"),
                             layers.Dropout(0.2, seed=3),
                             layers.Dense(3, "softmax")])

  def run(checkpoint_dir=None):
    keras.utils.set_random_seed(1)
    data = classification_data(shuffle=True)
    return _train(model_fn, data=data, loop=loop, epochs=3,
                  checkpoint_dir=checkpoint_dir,
                  metrics=[keras.metrics.SparseCategoricalAccuracy()])

  uninterrupted = run()
  armed.on = True
  with pytest.raises(training_loops.TrainingInterrupted,
                     match=rf"{signal.Signals(signal_number).name} at epoch "
                           rf"{where[0]} \(0-based\), step {where[1]}: "
                           "checkpoint saved") as raised:
    run(tmp_path)
  assert raised.value.history.epochs == list(range(where[0]))
  resumed = run(tmp_path)
  assert_same_run(resumed, uninterrupted, rtol=1e-6, atol=1e-7)


def test_sigterm_stops_a_script_cleanly_and_the_rerun_resumes(tmp_path):
  stopped, uninterrupted = tmp_path / "stopped", tmp_path / "whole"
  process = subprocess.Popen(_script(stopped), cwd=REPO,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  wait_for_epochs(stopped / "checkpoints" / "eager", 1, process)
  # Into epoch 1. An eager epoch takes under a second and its speed
  # varies, so where the run stopped is read back, not assumed.
  time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 128 + signal.SIGTERM
  partial = json.loads((stopped / "results.json").read_text())
  where = partial["interrupted"]
  assert where["signal"] == "SIGTERM" and where["epoch"] >= 1
  assert where["step"] > 0  # saved mid-epoch
  assert (f"Interrupted by SIGTERM at epoch {where['epoch']} (0-based), "
          f"step {where['step']}: checkpoint saved") in stderr
  assert "Traceback" not in stderr
  assert len(partial["loops"]["eager"]["history"]["loss"]) == where["epoch"]
  _rerun_and_compare(stopped, uninterrupted)
