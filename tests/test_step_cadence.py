"""`train(eval_every_steps=, checkpoint_every_steps=)`: validation and
checkpoints every N training steps, counted over the run, in every loop
Keras allows; a `kill -9` loses at most N steps and the rerun ends exactly
like an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import training_loops
from conftest import REPO
from loop_models import assert_same_run, classification_data, run_loop

# 50 examples in batches of 16: 4 steps an epoch (16, 16, 16, 2).
STEPS_PER_EPOCH = 4
VALIDATION = classification_data(examples=30, seed=1)


@pytest.fixture(scope="module")
def plain():
  return {loop: run_loop(loop, epochs=3, validation_data=VALIDATION)
          for loop in training_loops.LOOPS}


@pytest.fixture(scope="module")
def every_three(tmp_path_factory):
  log_root = tmp_path_factory.mktemp("logs")
  return {loop: run_loop(loop, epochs=3, validation_data=VALIDATION,
                         eval_every_steps=3,
                         log_dir=os.fspath(log_root / loop))
          for loop in training_loops.LOOPS}, log_root


def test_step_validation_does_not_change_training(plain, every_three):
  runs, _ = every_three
  for loop, history in runs.items():
    assert_same_run(history, plain[loop], rtol=1e-6, atol=1e-7)


def test_step_validation_runs_at_every_multiple_of_n(every_three):
  """12 steps: validations at 3, 6, 9 and 12 (the last is the third
  epoch's own, recorded once), each tagged with its epoch."""
  runs, _ = every_three
  for loop, history in runs.items():
    steps = history.step_history
    assert steps["step"] == [3, 6, 9, 12], loop
    assert steps["epoch"] == [0, 1, 2, 2], loop
    assert sorted(steps) == ["epoch", "step", "val_accuracy", "val_loss"]
    # Step 12 ends the run: it is the last epoch's validation.
    assert steps["val_loss"][-1] == history.history["val_loss"][-1]


def test_step_validations_agree_across_loops(every_three):
  runs, _ = every_three
  reference = runs["eager"].step_history
  for loop, history in runs.items():
    np.testing.assert_allclose(history.step_history["val_loss"],
                               reference["val_loss"],
                               rtol=1e-3 if loop == "keras_fit" else 1e-5,
                               err_msg=loop)


@pytest.mark.parametrize("loop", training_loops.LOOPS)
def test_a_step_validation_equals_the_epoch_end_validation_of_a_run_that_stops_there(
    loop):
  """Independent reference: the validation at step 2 is that of a run whose
  only epoch is the first two batches (unshuffled data, same seed)."""
  full = run_loop(loop, epochs=1, validation_data=VALIDATION,
                  eval_every_steps=2)
  first_two = run_loop(loop, epochs=1, validation_data=VALIDATION,
                       data=classification_data(sample_weights=True).take(2))
  assert full.step_history["step"][0] == 2
  np.testing.assert_allclose(full.step_history["val_loss"][0],
                             first_two.history["val_loss"][0], rtol=1e-6)
  np.testing.assert_allclose(full.step_history["val_accuracy"][0],
                             first_two.history["val_accuracy"][0])


def test_graph_loop_calls_end_at_the_cadence():
  """A whole-epoch graph call stops at each validation step; steps_per_loop
  calls are cut short there too, and the training is the same."""
  reference = run_loop("graph", epochs=2, validation_data=VALIDATION)
  for steps_per_loop in (None, 3):
    history = run_loop("graph", epochs=2, validation_data=VALIDATION,
                       eval_every_steps=5, steps_per_loop=steps_per_loop)
    assert history.step_history["step"] == [5], steps_per_loop
    assert_same_run(history, reference, rtol=1e-6, atol=1e-7)


def test_step_validations_go_to_tensorboard_by_step(every_three):
  _, log_root = every_three
  for loop in training_loops.LOOPS:
    directory = log_root / loop / "validation"
    values = {}
    for name in os.listdir(directory):
      for event in tf.compat.v1.train.summary_iterator(
          os.fspath(directory / name)):
        for value in event.summary.value:
          if value.tag == "evaluation_loss_vs_iterations":
            values[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(values) == [3, 6, 9, 12], loop


def test_learning_rate_is_in_the_history_at_each_epochs_end():
  import keras
  schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
      [STEPS_PER_EPOCH], [0.1, 0.01])
  for loop in training_loops.LOOPS:
    history = run_loop(loop, epochs=2,
                       optimizer_fn=lambda: keras.optimizers.SGD(schedule))
    # Epoch ends at steps 4 and 8; Keras' piecewise value holds up to and
    # including its boundary.
    np.testing.assert_allclose(history.history["learning_rate"],
                               [0.1, 0.01], err_msg=loop)


@pytest.mark.parametrize("kwargs,message", [
    (dict(eval_every_steps=0), "eval_every_steps must be a positive int"),
    (dict(checkpoint_every_steps=-2),
     "checkpoint_every_steps must be a positive int"),
    (dict(eval_every_steps=2), "eval_every_steps needs validation_data"),
    (dict(checkpoint_every_steps=2),
     "checkpoint_every_steps needs a checkpoint_dir"),
])
def test_bad_cadences_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    run_loop("graph", **kwargs)


def test_model_fit_refuses_step_checkpoints(tmp_path):
  with pytest.raises(ValueError, match="checkpoint_every_steps needs a loop "
                     "that resumes inside an epoch .*keras_fit starts only"):
    run_loop("keras_fit", checkpoint_every_steps=2,
             checkpoint_dir=os.fspath(tmp_path))


# -- kill -9 between step checkpoints ----------------------------------------

_JOB = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import keras
from loop_models import classification_data, classifier, run_loop

class KillAt(keras.callbacks.Callback):
  def __init__(self, step):
    super().__init__()
    self.step, self.done = step, 0
  def on_train_batch_end(self, batch, logs=None):
    self.done = self.model.optimizer.iterations.numpy()
    if self.done >= self.step:
      os.kill(os.getpid(), signal.SIGKILL)

kill_at = int(sys.argv[3])
keras.utils.set_random_seed(3)
history = run_loop(sys.argv[1], epochs=3, checkpoint_dir=sys.argv[2],
                   checkpoint_every_steps=3,
                   data=classification_data(shuffle=True),
                   model_fn=lambda: classifier(dropout_seed=7),
                   callbacks=[KillAt(kill_at)] if kill_at else [])
"""


def _run_job(loop, checkpoint_dir, kill_at):
  script = _JOB.format(tests=os.path.join(REPO, "tests"))
  return subprocess.run(
      [sys.executable, "-c", script, loop, os.fspath(checkpoint_dir),
       str(kill_at)], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _final_state(checkpoint_dir):
  reader = tf.train.load_checkpoint(os.fspath(checkpoint_dir))
  return {name: reader.get_tensor(name)
          for name, _ in tf.train.list_variables(os.fspath(checkpoint_dir))
          if "model_variables" in name or "optimizer" in name}


@pytest.mark.parametrize("loop", ["eager", "function", "graph"])
def test_kill_9_loses_at_most_n_steps_and_the_rerun_ends_exactly(
    loop, tmp_path):
  killed, whole = tmp_path / "killed", tmp_path / "whole"
  # Checkpoints at steps 3, 4 (epoch 0's end), 6, 8, ...; killed at the end
  # of the call that reaches step 7 (the graph loop's runs to step 8), before
  # any save there: the rerun starts from step 6, epoch 1's second step.
  process = _run_job(loop, killed, kill_at=7)
  assert process.returncode == -signal.SIGKILL, process.stderr
  saved = tf.train.load_checkpoint(os.fspath(killed))
  assert int(saved.get_tensor("steps_done/.ATTRIBUTES/VARIABLE_VALUE")) == 6
  assert int(saved.get_tensor("epochs_done/.ATTRIBUTES/VARIABLE_VALUE")) == 1
  assert int(saved.get_tensor(
      "steps_in_epoch/.ATTRIBUTES/VARIABLE_VALUE")) == 2
  for directory in (killed, whole):
    finished = _run_job(loop, directory, kill_at=0)
    assert finished.returncode == 0, finished.stderr
  resumed, reference = _final_state(killed), _final_state(whole)
  assert resumed.keys() == reference.keys() and resumed
  for name, value in reference.items():
    np.testing.assert_allclose(resumed[name], value, rtol=1e-6, atol=1e-7,
                               err_msg=name)
  histories = [json.loads((d / "history.json").read_text())
               for d in (killed, whole)]
  for key, values in histories[1]["history"].items():
    np.testing.assert_allclose(histories[0]["history"][key], values,
                               rtol=1e-6, err_msg=key)
