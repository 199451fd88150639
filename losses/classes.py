"""`keras.losses.Loss` classes over the per-example losses in `functions`.

Keras' `Loss.__call__` applies `sample_weight` and the reduction (default:
the mean over the batch), so each class here only names its function and
keyword arguments.
"""

import keras

from losses import functions


class _PerExampleLoss(keras.losses.Loss):
  """A `Loss` whose `call` is `per_example(y_true, y_pred, **options)`."""

  per_example = None  # set by each subclass

  def __init__(self, name, reduction="sum_over_batch_size", dtype=None,
               **options):
    super().__init__(name=name, reduction=reduction, dtype=dtype)
    self._options = options

  def call(self, y_true, y_pred):
    return type(self).per_example(y_true, y_pred, **self._options)

  def get_config(self):
    return {**super().get_config(), **self._options}


@keras.saving.register_keras_serializable(package="losses")
class MeanSquaredError(_PerExampleLoss):
  per_example = staticmethod(functions.mean_squared_error)

  def __init__(self, reduction="sum_over_batch_size",
               name="mean_squared_error", dtype=None):
    super().__init__(name, reduction, dtype)


@keras.saving.register_keras_serializable(package="losses")
class SparseCategoricalCrossentropy(_PerExampleLoss):
  per_example = staticmethod(functions.sparse_categorical_crossentropy)

  def __init__(self, from_logits=False, reduction="sum_over_batch_size",
               name="sparse_categorical_crossentropy", dtype=None):
    super().__init__(name, reduction, dtype, from_logits=from_logits)


@keras.saving.register_keras_serializable(package="losses")
class CategoricalCrossentropy(_PerExampleLoss):
  per_example = staticmethod(functions.categorical_crossentropy)

  def __init__(self, from_logits=False, label_smoothing=0.0,
               reduction="sum_over_batch_size",
               name="categorical_crossentropy", dtype=None):
    super().__init__(name, reduction, dtype, from_logits=from_logits,
                     label_smoothing=label_smoothing)

  def call(self, y_true, y_pred):
    return super().call(*functions.align_ranks(y_true, y_pred))


@keras.saving.register_keras_serializable(package="losses")
class BinaryCrossentropy(_PerExampleLoss):
  per_example = staticmethod(functions.binary_crossentropy)

  def __init__(self, from_logits=False, label_smoothing=0.0,
               reduction="sum_over_batch_size", name="binary_crossentropy",
               dtype=None):
    super().__init__(name, reduction, dtype, from_logits=from_logits,
                     label_smoothing=label_smoothing)

  def call(self, y_true, y_pred):
    return super().call(*functions.align_ranks(y_true, y_pred))
