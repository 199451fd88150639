"""Interrupted runs resume exactly: `kill -9` mid-epoch, and SIGINT/SIGTERM
stopping at a step boundary with the position saved."""

import json
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import layers
import training_loops
from conftest import REPO
from loop_models import (SignalAt, Switch, assert_same_run,
                         classification_data, run_loop, wait_for_epochs)


def _script(output_dir, epochs=4):
  # Batches of 8: an eager epoch of about a second, long enough for a
  # signal sent a moment after an epoch's checkpoint to land inside the
  # next one.
  return [sys.executable, "-m", "research", "classify", "--loop=eager",
          "--batch_size=8", f"--epochs={epochs}", "--verbose=0",
          f"--output_dir={output_dir}"]


def _rerun_and_compare(resumed, uninterrupted):
  """Runs the script to the end in both output dirs (resuming the first);
  their results must agree. Returns what each run did (`resumed_from`,
  `steps_trained`), the rest of results.json compared."""
  # Side by side: independent runs, one per core.
  processes = [subprocess.Popen(_script(output_dir), cwd=REPO,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
               for output_dir in (resumed, uninterrupted)]
  assert [process.wait(timeout=300) for process in processes] == [0, 0]
  results = [json.loads((d / "results.json").read_text())
             for d in (resumed, uninterrupted)]
  what_ran = [{loop: (report.pop("resumed_from"), report.pop("steps_trained"))
               for loop, report in result["loops"].items()}
              for result in results]
  _assert_same(*map(_comparable, results))
  return what_ran


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
  rerun, whole = _rerun_and_compare(killed, uninterrupted)
  # 1437 training examples: 180 batches of 8 an epoch. The rerun resumed
  # from the newest epoch checkpoint (the kill may land after a third)
  # and trained only the epochs after it.
  resumed_from, trained = rerun["eager"]
  epoch_from, step_from = resumed_from["epoch"], resumed_from["step"]
  assert epoch_from in (2, 3) and step_from == 0
  assert trained == (4 - epoch_from) * 180
  assert whole["eager"] == (None, 4 * 180)
  final = [tf.train.load_checkpoint(str(d / "checkpoints" / "eager"))
           for d in (killed, uninterrupted)]
  names = [n for n, _ in tf.train.list_variables(
      str(uninterrupted / "checkpoints" / "eager")) if "model_variables" in n]
  assert names
  for name in names:
    np.testing.assert_allclose(final[0].get_tensor(name),
                               final[1].get_tensor(name), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("loop,where", [
    ("eager", (1, 2)), ("function", (1, 2)), ("graph", (1, 4)),
    ("keras_fit", (2, 0))])
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_where_it_stopped_and_the_rerun_continues_exactly(
    loop, where, signal_number, tmp_path):
  armed = Switch()

  def model_fn():  # 4 steps an epoch: the 6th step is epoch 1, step 2
    return keras.Sequential([keras.Input((4,)),
                             SignalAt(6, signal_number, armed),
                             layers.Dense(8, "relu"),
                             layers.Dropout(0.2, seed=3),
                             layers.Dense(3, "softmax")])

  def run(checkpoint_dir=None):
    keras.utils.set_random_seed(1)
    data = classification_data(shuffle=True)
    return run_loop(loop, epochs=3, model_fn=model_fn, data=data, seed=1,
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
  stopped_at = 4 * where[0] + where[1]  # 4 steps an epoch
  assert raised.value.history.steps_trained == stopped_at
  resumed = run(tmp_path)
  assert_same_run(resumed, uninterrupted, rtol=1e-6, atol=1e-7)
  # It continued where it stopped, for the rest of the 12 steps.
  assert resumed.resumed_from == {"epoch": where[0], "step": where[1]}
  assert resumed.steps_trained == 12 - stopped_at


def test_model_fit_refuses_a_checkpoint_saved_mid_epoch(tmp_path):
  """fit cannot start inside an epoch: one line naming the directory,
  before anything trains."""
  armed = Switch()
  armed.on = True
  model_fn = lambda: keras.Sequential([
      keras.Input((4,)), SignalAt(6, signal.SIGINT, armed),
      layers.Dense(3, "softmax")])
  with pytest.raises(training_loops.TrainingInterrupted, match="step 2"):
    run_loop("eager", epochs=3, model_fn=model_fn, checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match=f"{tmp_path} was saved mid-epoch by "
                                       "a custom loop"):
    run_loop("keras_fit", epochs=3, model_fn=model_fn,
             checkpoint_dir=tmp_path)


def test_sigterm_stops_a_script_cleanly_and_the_rerun_resumes(tmp_path):
  stopped, uninterrupted = tmp_path / "stopped", tmp_path / "whole"
  process = subprocess.Popen(_script(stopped), cwd=REPO,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  wait_for_epochs(stopped / "checkpoints" / "eager", 1, process)
  # Into epoch 1. An eager epoch takes about a second and its speed
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
  stopped_at = 180 * where["epoch"] + where["step"]  # 180 batches an epoch
  assert partial["loops"]["eager"]["steps_trained"] == stopped_at
  rerun, _ = _rerun_and_compare(stopped, uninterrupted)
  assert rerun["eager"] == ({"epoch": where["epoch"], "step": where["step"]},
                            4 * 180 - stopped_at)
