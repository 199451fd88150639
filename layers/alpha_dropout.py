"""Alpha dropout (Klambauer et al., 2017) for self-normalizing SELU networks."""

import math

import keras
import tensorflow as tf

from layers.dropout import RandomDrop

# SELU's constants: dropped units are set to SELU's negative saturation value.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_SATURATION = -_SELU_ALPHA * _SELU_SCALE


@keras.saving.register_keras_serializable(package="layers")
class AlphaDropout(RandomDrop):
  """Sets each input to SELU's saturation value `-alpha * scale` with
  probability `rate` while training, then applies the affine map `a * x + b`
  that restores mean 0 and variance 1 for a standardized input; the identity
  otherwise. Inputs and outputs: any shape.
  """

  def __init__(self, rate, seed=None, **kwargs):
    super().__init__(rate, seed, **kwargs)
    self._scale = 1.0 / math.sqrt(
        (1.0 - self.rate) * (1.0 + self.rate * _SATURATION**2))
    self._shift = -self._scale * _SATURATION * self.rate

  def call(self, inputs, training=None):
    if not training or self.rate == 0.0:
      return inputs
    saturated = tf.fill(tf.shape(inputs), tf.cast(_SATURATION, inputs.dtype))
    dropped = tf.where(self.keep_mask(inputs), inputs, saturated)
    return self._scale * dropped + self._shift
