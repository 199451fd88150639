"""Callbacks in every loop: TensorBoard events with Keras' tags, early
stopping where Keras stops, best-model checkpoints."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import layers
import training_loops
from loop_models import classification_data, classifier, run_loop, sgd


def _scalars(directory):
  accumulator = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  scalars = {}
  for tag in accumulator.Tags()["tensors"]:
    values = [tf.make_ndarray(event.tensor_proto)
              for event in accumulator.Tensors(tag)]
    if all(v.dtype.kind == "f" and v.ndim == 0 for v in values):
      scalars[tag] = [float(v) for v in values]
  return scalars


def test_tensorboard_events_carry_keras_tags(tmp_path):
  validation = classification_data(examples=20, seed=1)
  keras_dir = str(tmp_path / "keras_callback")
  run_loop("keras_fit", validation_data=validation,
           callbacks=[keras.callbacks.TensorBoard(keras_dir)])
  keras_tags = {split: set(_scalars(os.path.join(keras_dir, split)))
                for split in ("train", "validation")}
  for loop in ("graph", "keras_fit"):
    log_dir = str(tmp_path / loop)
    history = run_loop(loop, validation_data=validation, log_dir=log_dir)
    train = _scalars(os.path.join(log_dir, "train"))
    validation_scalars = _scalars(os.path.join(log_dir, "validation"))
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= (
        keras_tags["train"])
    assert keras_tags["train"] <= set(train)
    assert {"epoch_loss", "epoch_accuracy"} <= keras_tags["validation"]
    assert {"epoch_loss", "epoch_accuracy"} <= set(validation_scalars)
    np.testing.assert_allclose(train["epoch_loss"], history.history["loss"],
                               rtol=1e-6)
    np.testing.assert_allclose(validation_scalars["epoch_loss"],
                               history.history["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(train["epoch_learning_rate"], [0.1, 0.1],
                               rtol=1e-6)
    np.testing.assert_allclose(train["epoch_steps_per_second"],
                               history.steps_per_second, rtol=1e-6)


@pytest.mark.parametrize("sequence,patience,min_delta", [
    ([1.0, 0.5, 0.6, 0.7, 0.2], 1, 0.0),
    ([1.0, 0.99, 0.98, 0.97, 0.5], 1, 0.05),
    ([3.0, 2.0, 1.0, 0.5, 0.4], 0, 0.0)])
def test_early_stopping_stops_where_keras_does(sequence, patience, min_delta):
  def stopped_epoch(callback):
    model = keras.Sequential([keras.Input((1,)), layers.Dense(1)])
    callback.set_model(model)
    model.stop_training = False
    callback.on_train_begin()
    for epoch, value in enumerate(sequence):
      model.layers[0].kernel.assign([[float(epoch)]])
      callback.on_epoch_end(epoch, {"val_loss": value})
      if model.stop_training:
        break
    callback.on_train_end()  # where Keras restores the best weights
    return epoch, float(model.layers[0].kernel.numpy()[0, 0])

  ours = stopped_epoch(training_loops.EarlyStopping(
      patience=patience, min_delta=min_delta, restore_best_weights=True))
  theirs = stopped_epoch(keras.callbacks.EarlyStopping(
      patience=patience, min_delta=min_delta, restore_best_weights=True))
  assert ours == theirs


def test_early_stopping_and_best_checkpoint_in_every_loop(tmp_path):
  validation = classification_data(examples=20, seed=1)
  for loop in training_loops.LOOPS:
    stopper = training_loops.EarlyStopping(monitor="val_loss", patience=1)
    best = training_loops.BestModelCheckpoint(
        tmp_path / f"{loop}.weights.h5", monitor="val_accuracy")
    # A learning rate of 0 never improves (no BatchNorm statistics move
    # either): stop after epoch 1 (0-based).
    history = run_loop(loop, epochs=6, validation_data=validation,
                       optimizer_fn=sgd(0.0), callbacks=[stopper, best],
                       model_fn=lambda: classifier(batch_norm=False))
    assert history.epochs == [0, 1], loop
    assert stopper.stopped_epoch == 1 and best.best_epoch == 0
    restored = classifier(batch_norm=False)
    restored.load_weights(tmp_path / f"{loop}.weights.h5")
    for ours, saved in zip(history.model.get_weights(),
                           restored.get_weights()):
      np.testing.assert_allclose(ours, saved)
