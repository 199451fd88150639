"""Inverted dropout (Srivastava et al., 2014), and the base of AlphaDropout."""

import numbers

import keras
import tensorflow as tf


class RandomDrop(keras.layers.Layer):
  """Base of the dropout layers: a validated `rate` and a random keep mask.

  The random stream is a `keras.random.SeedGenerator`: one of the layer's
  variables, so checkpoints save it and a resumed run draws the same masks.
  """

  def __init__(self, rate, seed=None, **kwargs):
    super().__init__(**kwargs)
    if (isinstance(rate, bool) or not isinstance(rate, numbers.Real)
        or not 0.0 <= rate < 1.0):
      raise ValueError(f"{type(self).__name__}: rate must be a number in "
                       f"[0, 1), got {rate!r}.")
    self.rate = float(rate)
    self.seed = seed
    self.seed_generator = keras.random.SeedGenerator(seed)

  def keep_mask(self, inputs):
    """True where an input is kept (probability `1 - rate`)."""
    # Drawn in float32 whatever the inputs' dtype: bfloat16's uniforms are
    # multiples of 1/128 (P(u >= 0.3) = 0.695, not 0.7), and the masks stay
    # those of a float32 run with the same seed.
    return keras.random.uniform(tf.shape(inputs), dtype="float32",
                                seed=self.seed_generator) >= self.rate

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package="layers")
class Dropout(RandomDrop):
  """Zeroes each input with probability `rate` while training and scales the
  rest by `1 / (1 - rate)`, so the expected output equals the input; the
  identity otherwise. Inputs and outputs: any shape.
  """

  def call(self, inputs, training=None):
    if not training or self.rate == 0.0:
      return inputs
    # A product by the reciprocal, as `tf.nn.dropout` (Keras') computes it:
    # a division by a constant, which a compiled step's graph optimizer
    # folds into that product, would round 1 ulp apart eagerly.
    return tf.where(self.keep_mask(inputs),
                    inputs * (1.0 / (1.0 - self.rate)),
                    tf.zeros_like(inputs))
