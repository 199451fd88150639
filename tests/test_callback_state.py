"""Callback state in checkpoints: an interrupted run with early stopping and
a best-model checkpoint, resumed, stops at the epoch, keeps the best model
and ends with the weights of an uninterrupted run, in every loop; a rerun of
a run early stopping ended trains no further."""

import logging
import math
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

import layers
import training_loops
from loop_models import (SignalAt, Switch, assert_same_run,
                         classification_data, run_loop, sgd)
from research.experiments.early_stopping import (stopping_callbacks,
                                                 stopping_report)
from training_loops import callback_state

# The premise of the resume tests, checked on each uninterrupted run:
# val_loss is lowest at epoch 1 and rises from epoch 2, where the SIGINT
# falls, so early stopping (patience 2) ends the run at epoch 3. A resume
# that forgot the callbacks' state would count its patience, and save its
# best model, from epoch 2 on.
BEST_EPOCH, STOPPED_EPOCH = 1, 3


@pytest.fixture(scope="module")
def data():
  """Training data, and validation data with a third of its labels moved
  to the next class: once the model grows confident, val_loss rises."""
  x = np.random.default_rng(1).normal(size=(30, 4)).astype("float32")
  y = np.minimum((x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1), 2)
  y[:10] = (y[:10] + 1) % 3
  validation = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
  return classification_data(), validation


def _model_fn(armed):
  # 4 steps an epoch: the 10th step is epoch 2, step 2.
  return lambda: keras.Sequential([
      keras.Input((4,)), SignalAt(10, signal.SIGINT, armed),
      layers.Dense(8, "relu"), layers.Dense(3, "softmax")])


def _run(loop, data, output_dir, armed=None):
  """research.experiments.early_stopping' run: our callbacks in the custom
  loops, Keras' in `model.fit`. Returns the `History` and the callbacks."""
  callbacks = stopping_callbacks(loop, output_dir, patience=2)
  history = run_loop(loop, epochs=10, data=data[0], validation_data=data[1],
                     model_fn=_model_fn(armed or Switch()),
                     optimizer_fn=sgd(0.05), metrics=[],
                     checkpoint_dir=output_dir / "checkpoints",
                     callbacks=callbacks)
  return history, callbacks


def _best_weights(loop, output_dir):
  model = _model_fn(Switch())()
  model.load_weights(output_dir / "best" / f"{loop}.weights.h5")
  return model.get_weights()


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
  """loop -> (History, callbacks, output directory) of its uninterrupted
  run, shared by the tests of that loop."""
  runs = {}

  def run(loop):
    if loop not in runs:
      output_dir = tmp_path_factory.mktemp(loop)
      runs[loop] = (*_run(loop, data, output_dir), output_dir)
      history, callbacks, _ = runs[loop]
      assert stopping_report(history, callbacks)["stopped_epoch"] == (
          STOPPED_EPOCH)
      assert callbacks[0].best_epoch == BEST_EPOCH
    return runs[loop]
  return run


@pytest.mark.parametrize("loop", training_loops.LOOPS)
def test_an_interrupted_run_resumes_its_callbacks_and_ends_as_uninterrupted(
    loop, data, uninterrupted, tmp_path):
  reference, reference_callbacks, reference_dir = uninterrupted(loop)
  armed = Switch()
  armed.on = True
  with pytest.raises(training_loops.TrainingInterrupted) as raised:
    _run(loop, data, tmp_path, armed)
  assert raised.value.history.epochs[-1] >= BEST_EPOCH  # best: before it
  resumed, callbacks = _run(loop, data, tmp_path)
  stopped = raised.value
  assert resumed.resumed_from == {"epoch": stopped.epoch,
                                  "step": stopped.step}
  # Between them, the two calls trained the uninterrupted run's steps.
  assert (stopped.history.steps_trained + resumed.steps_trained
          == reference.steps_trained)
  assert stopping_report(resumed, callbacks) == stopping_report(
      reference, reference_callbacks)
  assert callbacks[0].best_epoch == BEST_EPOCH
  assert callbacks[1].best == reference_callbacks[1].best
  assert_same_run(resumed, reference, rtol=1e-6, atol=1e-7)
  # The best model file holds the best epoch's weights, which early
  # stopping also left in the model.
  for ours, theirs, final in zip(_best_weights(loop, tmp_path),
                                 _best_weights(loop, reference_dir),
                                 reference.model.get_weights()):
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(theirs, final)


@pytest.mark.parametrize("loop", training_loops.LOOPS)
def test_a_rerun_of_an_early_stopped_run_trains_no_further(
    loop, data, uninterrupted):
  reference, reference_callbacks, output_dir = uninterrupted(loop)
  rerun, callbacks = _run(loop, data, output_dir)
  assert rerun.resumed_from is not None and rerun.steps_trained == 0
  assert stopping_report(rerun, callbacks) == stopping_report(
      reference, reference_callbacks)
  assert rerun.epochs == reference.epochs
  assert rerun.history == reference.history
  for weight, expected in zip(rerun.model.get_weights(),
                              reference.model.get_weights()):
    np.testing.assert_array_equal(weight, expected)


def test_reduce_lr_on_plateau_resumes_its_patience(data, tmp_path):
  def run(directory, armed):
    return run_loop(
        "graph", epochs=6, data=data[0], validation_data=data[1],
        model_fn=_model_fn(armed), optimizer_fn=sgd(0.05), metrics=[],
        checkpoint_dir=directory,
        callbacks=[keras.callbacks.ReduceLROnPlateau(patience=1,
                                                     factor=0.5)])

  reference = run(tmp_path / "whole", Switch())
  rates = reference.history["learning_rate"]
  # Lowered at the end of epoch 2 (the first without improvement, which
  # the SIGINT interrupts), after the history took that epoch's rate.
  np.testing.assert_allclose(rates[:4], [0.05, 0.05, 0.05, 0.025],
                             rtol=1e-6)
  armed = Switch()
  armed.on = True
  with pytest.raises(training_loops.TrainingInterrupted):
    run(tmp_path / "resumed", armed)
  resumed = run(tmp_path / "resumed", Switch())
  assert resumed.history["learning_rate"] == rates
  assert_same_run(resumed, reference, rtol=1e-6, atol=1e-7)


def _epochs(callbacks, model, sequence, first_epoch=0):
  """Ends epochs with `sequence` as val_loss, the epoch as the kernel, as
  fit would; returns the epoch a callback stopped at, or None."""
  for epoch, value in enumerate(sequence, first_epoch):
    model.layers[0].kernel.assign([[float(epoch)]])
    for callback in callbacks:
      callback.on_epoch_end(epoch, {"val_loss": value})
    if model.stop_training:
      return epoch
  return None


def _started(callbacks):
  model = keras.Sequential([keras.Input((1,)), layers.Dense(1)])
  model.stop_training = False
  for callback in callbacks:
    callback.set_model(model)
    callback.on_train_begin()
  return model


def test_the_state_round_trips_and_the_restored_callbacks_carry_on_alike():
  """Saved after three epochs, restored into fresh callbacks after their
  `on_train_begin`: the fresh ones hold the same values and then stop at
  the epoch, and restore the weights, the originals do."""
  def make():
    return [keras.callbacks.History(),  # not resumable: skipped
            training_loops.EarlyStopping(patience=3,
                                         restore_best_weights=True),
            keras.callbacks.EarlyStopping(patience=3,
                                          restore_best_weights=True)]

  originals = make()
  model = _started(originals)
  assert _epochs(originals, model, [1.0, 0.5, 0.7]) is None
  saved = callback_state.CallbackState(originals, model).serialize()
  restored = make()
  restored_model = _started(restored)
  state = callback_state.CallbackState(restored, restored_model)
  state.deserialize(saved)
  state.apply()
  assert not state.stopped
  for original, fresh in zip(originals[1:], restored[1:]):
    assert (fresh.best, fresh.best_epoch, fresh.wait, fresh.stopped_epoch) == (
        original.best, original.best_epoch, original.wait,
        original.stopped_epoch)
    for ours, theirs in zip(fresh.best_weights, original.best_weights):
      np.testing.assert_array_equal(ours, theirs)
      assert ours.dtype == theirs.dtype
  later = [0.8, 0.9, 1.0]
  assert _epochs(restored, restored_model, later, 3) == (
      _epochs(originals, model, later, 3)) == 4
  for callbacks, weights in ((originals, model), (restored, restored_model)):
    callbacks[2].on_train_end()  # where Keras restores the best weights
    assert float(weights.layers[0].kernel.numpy()[0, 0]) == 1.0

  model.stop_training = True
  state.deserialize(callback_state.CallbackState(originals, model).serialize())
  assert state.stopped


class _EpochLog(keras.callbacks.Callback):
  """A user's callback that counts epochs and keeps their losses."""

  def on_train_begin(self, logs=None):
    self.seen, self.losses = 0, []

  def on_epoch_end(self, epoch, logs=None):
    self.seen += 1
    self.losses.append(logs["loss"])


def test_register_makes_a_users_callback_resumable(tmp_path, monkeypatch):
  monkeypatch.setattr(callback_state, "_RESUMABLE",
                      dict(callback_state._RESUMABLE))
  callback_state.register(_EpochLog, ["seen", "losses"])
  with pytest.raises(TypeError, match="a list of names"):
    callback_state.register(_EpochLog, "seen")
  whole = _EpochLog()
  run_loop("graph", epochs=4, callbacks=[whole])
  run_loop("graph", epochs=2, checkpoint_dir=tmp_path,
           callbacks=[_EpochLog()])
  resumed = _EpochLog()
  run_loop("graph", epochs=4, checkpoint_dir=tmp_path, callbacks=[resumed])
  assert resumed.seen == whole.seen == 4
  np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-6)


def test_a_callback_of_another_class_keeps_its_state_with_a_warning(caplog):
  stopper = training_loops.EarlyStopping(patience=3)
  model = _started([stopper])
  _epochs([stopper], model, [1.0, 0.5])
  saved = callback_state.CallbackState([stopper], model).serialize()
  best = training_loops.BestModelCheckpoint("best.weights.h5")
  state = callback_state.CallbackState([best], _started([best]))
  state.deserialize(saved)
  with caplog.at_level(logging.WARNING):
    state.apply()
  assert ("Callback 0 was training_loops.callbacks.EarlyStopping when the "
          "checkpoint was saved and is "
          "training_loops.callbacks.BestModelCheckpoint now: its state "
          "(best, best_epoch, wait, stopped_epoch, best_weights) is not "
          "restored.") in caplog.text
  assert (best.best, best.best_epoch) == (math.inf, None)
  state = callback_state.CallbackState([], model)
  state.deserialize(saved)
  with caplog.at_level(logging.WARNING):
    state.apply()
  assert "is missing now" in caplog.text


def test_best_weights_of_any_dtype_round_trip():
  """bfloat16 (a `mixed_bfloat16` model's weights are float32, but a
  `bfloat16` one's are not) is not a NumPy dtype of its own: npz alone
  would give it back as raw bytes, which `set_weights` refuses."""
  weights = [np.array([[1.5, -2.0]], dtype=tf.bfloat16.as_numpy_dtype),
             np.array([3, 4], dtype="int64"),
             np.array(0.25, dtype="float16")]
  stopper = training_loops.EarlyStopping(restore_best_weights=True)
  model = _started([stopper])
  stopper.best_weights = weights
  saved = callback_state.CallbackState([stopper], model).serialize()
  fresh = training_loops.EarlyStopping(restore_best_weights=True)
  state = callback_state.CallbackState([fresh], _started([fresh]))
  state.deserialize(saved)
  state.apply()
  for restored, original in zip(fresh.best_weights, weights):
    assert restored.dtype == original.dtype
    np.testing.assert_array_equal(restored, original)


def test_a_checkpoint_saved_before_callback_state_resumes(tmp_path,
                                                          monkeypatch,
                                                          caplog):
  reference = run_loop("graph", epochs=3)
  with monkeypatch.context() as patch:  # as the code before it saved
    patch.setattr(training_loops.controller, "CallbackState",
                  lambda *_: None)
    run_loop("graph", epochs=2, checkpoint_dir=tmp_path)
  with caplog.at_level(logging.WARNING):
    resumed = run_loop("graph", epochs=3, checkpoint_dir=tmp_path)
  assert "holds no callback state (it predates it)" in caplog.text
  assert not (tmp_path / "damaged").exists()
  assert_same_run(resumed, reference, rtol=1e-6)
