"""Input scaling layers whose statistics are fitted in one pass by `adapt`."""

import numpy as np
import keras
import tensorflow as tf

# Below this spread a feature is treated as constant: it is centred but not
# divided, so it maps to 0 instead of inf/NaN (scikit-learn's convention).
_MIN_SPREAD = 1e-12


class _FeatureScaler(keras.layers.Layer):
  """`(x - offset) / scale` per feature (last axis), fitted by `adapt`.

  Inputs and outputs: `[..., features]`. Weights (non-trainable, saved with
  the model): `offset` and `scale`, `[features]`. Until `adapt` is called the
  layer is the identity.
  """

  def build(self, input_shape):
    if len(input_shape) < 2 or input_shape[-1] is None:
      raise ValueError(
          f"{type(self).__name__} expects inputs [..., features] with a known "
          f"feature count, got shape {tuple(input_shape)}.")
    features = (input_shape[-1],)
    self.offset = self.add_weight(name="offset", shape=features,
                                  initializer="zeros", trainable=False)
    self.scale = self.add_weight(name="scale", shape=features,
                                 initializer="ones", trainable=False)

  def adapt(self, data):
    """Fits the statistics in one pass over `data`.

    Args:
      data: a NumPy array `[examples, ..., features]`, or a `tf.data.Dataset`
        of such batches (features only, no labels).
    """
    batches = _feature_batches(type(self).__name__, data)
    moments = _RunningMoments()
    for batch in batches:
      if not self.built:
        self.build(batch.shape)
      if batch.shape[-1] != self.offset.shape[0]:
        raise ValueError(
            f"{type(self).__name__}.adapt: batch has {batch.shape[-1]} "
            f"features, the layer has {self.offset.shape[0]}.")
      moments.update(batch.reshape(-1, batch.shape[-1]))
    if moments.count == 0:
      raise ValueError(f"{type(self).__name__}.adapt: the data is empty.")
    offset, spread = self._offset_and_spread(moments)
    scale = np.where(spread > _MIN_SPREAD, spread, 1.0)
    self.offset.assign(offset.astype(self.offset.dtype))
    self.scale.assign(scale.astype(self.scale.dtype))

  def _offset_and_spread(self, moments):
    raise NotImplementedError

  def call(self, inputs):
    return (inputs - self.offset) / self.scale

  def compute_output_shape(self, input_shape):
    return input_shape


@keras.saving.register_keras_serializable(package="layers")
class Standardize(_FeatureScaler):
  """Z-score: `x* = (x - mean) / std`, population statistics per feature."""

  def _offset_and_spread(self, moments):
    return moments.mean, np.sqrt(moments.variance)


@keras.saving.register_keras_serializable(package="layers")
class MinMaxScale(_FeatureScaler):
  """Min-max scaling: `x* = (x - min) / (max - min)` per feature."""

  def _offset_and_spread(self, moments):
    return moments.minimum, moments.maximum - moments.minimum


class _RunningMoments:
  """Count, mean, variance, min and max merged batch by batch.

  Batches are merged with Chan et al.'s pairwise update in float64, so one
  pass is as accurate as two and never holds the whole dataset.
  """

  def __init__(self):
    self.count = 0
    self.mean = self._sum_sq = self.minimum = self.maximum = None

  def update(self, rows):
    """Merges `rows` `[examples, features]`."""
    rows = rows.astype(np.float64)
    if rows.shape[0] == 0:
      return
    if not np.all(np.isfinite(rows)):
      raise ValueError("adapt: the data contains NaN or infinite values.")
    batch_count = rows.shape[0]
    batch_mean = rows.mean(axis=0)
    batch_sum_sq = np.square(rows - batch_mean).sum(axis=0)
    if self.count == 0:
      self.mean, self._sum_sq = batch_mean, batch_sum_sq
      self.minimum, self.maximum = rows.min(axis=0), rows.max(axis=0)
    else:
      total = self.count + batch_count
      delta = batch_mean - self.mean
      self.mean = self.mean + delta * batch_count / total
      self._sum_sq = (self._sum_sq + batch_sum_sq
                      + np.square(delta) * self.count * batch_count / total)
      self.minimum = np.minimum(self.minimum, rows.min(axis=0))
      self.maximum = np.maximum(self.maximum, rows.max(axis=0))
    self.count += batch_count

  @property
  def variance(self):
    return self._sum_sq / self.count


def _feature_batches(layer_name, data):
  """Yields NumPy batches from an array or a dataset of feature batches."""
  if isinstance(data, tf.data.Dataset):
    if isinstance(data.element_spec, (tuple, dict)):
      raise ValueError(
          f"{layer_name}.adapt expects a dataset of feature batches only; "
          f"got elements {data.element_spec}. Map it first, e.g. "
          "dataset.map(lambda x, y: x).")
    for batch in data.as_numpy_iterator():
      yield _as_rows(layer_name, batch)
  else:
    yield _as_rows(layer_name, np.asarray(data))


def _as_rows(layer_name, batch):
  if batch.ndim < 2:
    raise ValueError(f"{layer_name}.adapt expects data [examples, ..., "
                     f"features], got shape {batch.shape}.")
  if not np.issubdtype(batch.dtype, np.number):
    raise ValueError(f"{layer_name}.adapt expects numeric data, got dtype "
                     f"{batch.dtype}.")
  return batch
