"""The `model.fit` baseline, configured like the custom loops."""

import math

import keras
import tensorflow as tf

from training_loops import trainer as trainer_lib


def fit(model, optimizer, loss, loss_weights, metrics, train_data,
        validation_data, epochs, initial_epoch, steps_per_loop, jit_compile,
        callbacks, verbose):
  """Compiles `model` as the custom loops use it and runs `model.fit`.

  `steps_per_loop` becomes `steps_per_execution`; `jit_compile` is passed
  explicitly, since Keras' "auto" turns XLA off on CPU-only machines.
  """
  multi_output = not isinstance(loss, keras.losses.Loss)
  copies = trainer_lib.copied_metrics(metrics, multi_output)
  if isinstance(metrics, dict):
    compiled_metrics = {key: [m for (k, _), m in copies.items() if k == key]
                        for key in metrics}
  else:
    compiled_metrics = list(copies.values())
  model.compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights,
                metrics=compiled_metrics or None,
                steps_per_execution=steps_per_loop or 1,
                jit_compile=jit_compile)
  # With steps_per_epoch given, fit opens one dataset iterator per epoch, as
  # the custom loops do (without it, two: one is opened and dropped at each
  # epoch's end), so `replay_data_order` resumes shuffled data alike.
  cardinality = int(train_data.cardinality())
  try:
    model.fit(train_data, epochs=epochs, initial_epoch=initial_epoch,
              steps_per_epoch=cardinality if cardinality > 0 else None,
              validation_data=validation_data, callbacks=list(callbacks),
              shuffle=False, verbose=verbose)
  except tf.errors.InvalidArgumentError as error:  # fit does not say where
    raise trainer_lib.TrainingDataError(None, error) from error


class StopOnNonFiniteLoss(keras.callbacks.Callback):
  """Raises `NonFiniteLossError` at the end of an epoch whose loss is NaN or
  infinite. Per epoch, not per batch: a batch hook would make `model.fit`
  return to Python every step and slow the baseline down."""

  def on_epoch_end(self, epoch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(loss):
      raise trainer_lib.NonFiniteLossError(epoch, None, loss)
