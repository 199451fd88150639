"""Inverted dropout (Srivastava et al., 2014)."""

import numbers

import keras
import tensorflow as tf


def check_rate(layer_name, rate):
  """Raises a `ValueError` unless `rate` is a number in [0, 1)."""
  if (isinstance(rate, bool) or not isinstance(rate, numbers.Real)
      or not 0.0 <= rate < 1.0):
    raise ValueError(f"{layer_name}: rate must be a number in [0, 1), "
                     f"got {rate!r}.")


@keras.saving.register_keras_serializable(package="layers")
class Dropout(keras.layers.Layer):
  """Zeroes each input with probability `rate` while training and scales the
  rest by `1 / (1 - rate)`, so the expected output equals the input; the
  identity otherwise. Inputs and outputs: any shape.

  The random stream is a `keras.random.SeedGenerator`: a variable of the
  layer, so it is checkpointed and a resumed run draws the same masks.
  """

  def __init__(self, rate, seed=None, **kwargs):
    super().__init__(**kwargs)
    check_rate(type(self).__name__, rate)
    self.rate = float(rate)
    self.seed = seed
    self.seed_generator = keras.random.SeedGenerator(seed)

  def call(self, inputs, training=None):
    if not training or self.rate == 0.0:
      return inputs
    keep = keras.random.uniform(
        tf.shape(inputs), dtype=inputs.dtype,
        seed=self.seed_generator) >= self.rate
    return tf.where(keep, inputs / (1.0 - self.rate), tf.zeros_like(inputs))

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "rate": self.rate, "seed": self.seed}
