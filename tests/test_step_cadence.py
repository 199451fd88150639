"""`train(eval_every_steps=, checkpoint_every_steps=)`: validation and
checkpoints every N training steps, counted over the run, in every loop
Keras allows; a `kill -9` loses at most N steps and the rerun ends exactly
like an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import training_loops
from conftest import REPO
import layers
from loop_models import (SignalAt, Switch, assert_same_run,
                         classification_data, classifier, run_loop)

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
  """fit's validations by step run the graph loop's eval step: the compiled
  loops agree with it to the bit, eager within float32's rounding of ops
  run one by one (9.7e-8 relative measured)."""
  runs, _ = every_three
  reference = runs["keras_fit"].step_history
  for loop, history in runs.items():
    np.testing.assert_allclose(history.step_history["val_loss"],
                               reference["val_loss"],
                               rtol=2e-7 if loop == "eager" else 1e-7,
                               err_msg=loop)


@pytest.mark.parametrize("loop", training_loops.LOOPS)
def test_step_validation_equals_epoch_end_validation_of_a_run_stopping_there(
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


def test_model_fit_executions_of_several_steps_validate_where_they_end(
    tmp_path):
  """Fit calls its batch hooks per execution of 3 steps, naming the last
  one of an epoch (1 step) as if it were full: the count stays exact
  (steps 3, 7 and 11 end the executions that cross 3, 6 and 9; 12 is the
  last epoch's end) and the checkpoint holds 12 steps."""
  history = run_loop("keras_fit", epochs=3, validation_data=VALIDATION,
                     eval_every_steps=3, steps_per_loop=3,
                     checkpoint_dir=os.fspath(tmp_path))
  assert history.step_history["step"] == [3, 7, 11, 12]
  saved = tf.train.load_checkpoint(os.fspath(tmp_path))
  assert int(saved.get_tensor("steps_done/.ATTRIBUTES/VARIABLE_VALUE")) == 12


def test_model_fit_refuses_multi_step_executions_on_data_of_unknown_length():
  unknown = classification_data().filter(lambda x, y: True)
  with pytest.raises(ValueError, match="needs train_data of known length"):
    run_loop("keras_fit", data=unknown, validation_data=VALIDATION,
             eval_every_steps=2, steps_per_loop=2)


def test_data_of_unknown_length_validates_each_step_once():
  """The last step of an epoch is only known as such after it ran: it is
  validated then, and not again at the epoch's end."""
  unknown = classification_data(sample_weights=True).filter(
      lambda x, y, w: True)
  history = run_loop("graph", epochs=2, data=unknown,
                     validation_data=VALIDATION, eval_every_steps=2)
  assert history.step_history["step"] == [2, 4, 6, 8]
  reference = run_loop("graph", epochs=2, validation_data=VALIDATION)
  assert_same_run(history, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loop", ["eager", "graph"])
def test_a_resumed_run_keeps_its_step_validations(loop, tmp_path):
  """SIGINT at the 6th step (epoch 1, step 2), saved there; the rerun's
  step history, restored from the checkpoint's history and step count,
  equals an uninterrupted run's."""
  armed = Switch()

  def model_fn():
    return keras.Sequential([keras.Input((4,)),
                             SignalAt(6, signal.SIGINT, armed),
                             layers.Dense(8, "relu"),
                             layers.Dense(3, "softmax")])

  def run(checkpoint_dir=None):
    return run_loop(loop, epochs=3, model_fn=model_fn,
                    validation_data=VALIDATION, eval_every_steps=3,
                    checkpoint_dir=checkpoint_dir)

  uninterrupted = run()
  armed.on = True
  with pytest.raises(training_loops.TrainingInterrupted, match="step 2"):
    run(os.fspath(tmp_path))
  resumed = run(os.fspath(tmp_path))
  # From the 6th step, not from scratch: 6 of the 12 steps trained here.
  assert (resumed.resumed_from, resumed.steps_trained) == (
      {"epoch": 1, "step": 2}, 6)
  assert resumed.step_history["step"] == [3, 6, 9, 12]
  for key, values in uninterrupted.step_history.items():
    np.testing.assert_allclose(resumed.step_history[key], values,
                               rtol=1e-6, err_msg=key)


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
from test_step_cadence import run

class KillAt(keras.callbacks.Callback):
  def __init__(self, step):
    super().__init__()
    self.step, self.done = step, 0
  def on_train_batch_end(self, batch, logs=None):
    self.done = self.model.optimizer.iterations.numpy()
    if self.done >= self.step:
      os.kill(os.getpid(), signal.SIGKILL)

kill_at = int(sys.argv[3])
run(sys.argv[1], sys.argv[2], [KillAt(kill_at)] if kill_at else [])
"""


def run(loop, checkpoint_dir, callbacks=()):
  """The run the job makes (and the test, uninterrupted)."""
  keras.utils.set_random_seed(3)
  return run_loop(loop, epochs=3, checkpoint_dir=checkpoint_dir,
                  checkpoint_every_steps=3,
                  data=classification_data(shuffle=True),
                  model_fn=lambda: classifier(dropout_seed=7),
                  callbacks=callbacks)


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


# The function loop's calls are the eager loop's, one step each: the graph
# loop is the one whose calls the cadence cuts short.
@pytest.mark.parametrize("loop", ["eager", "graph"])
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
  finished = _run_job(loop, killed, kill_at=0)
  assert finished.returncode == 0, finished.stderr
  run(loop, os.fspath(whole))
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
