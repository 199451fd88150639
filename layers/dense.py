"""A fully connected layer.

Numerically interchangeable with `keras.layers.Dense`.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="layers")
class Dense(keras.layers.Layer):
  """`activation(inputs @ kernel + bias)` on the last axis.

  Inputs: `[..., in_features]` (rank >= 2). Outputs: `[..., units]`.
  Weights: `kernel` `[in_features, units]`, `bias` `[units]`.
  """

  def __init__(self, units, activation=None, use_bias=True,
               kernel_initializer="glorot_uniform", bias_initializer="zeros",
               **kwargs):
    super().__init__(**kwargs)
    if not isinstance(units, int) or units <= 0:
      raise ValueError(f"Dense: units must be a positive int, got {units!r}.")
    self.units = units
    self.activation = keras.activations.get(activation)
    self.use_bias = use_bias
    self.kernel_initializer = keras.initializers.get(kernel_initializer)
    self.bias_initializer = keras.initializers.get(bias_initializer)

  def build(self, input_shape):
    if len(input_shape) < 2 or input_shape[-1] is None:
      raise ValueError(
          f"Dense expects inputs of rank >= 2 with a known last dimension, "
          f"got shape {tuple(input_shape)}.")
    self.kernel = self.add_weight(
        name="kernel", shape=(input_shape[-1], self.units),
        initializer=self.kernel_initializer)
    self.bias = (self.add_weight(name="bias", shape=(self.units,),
                                 initializer=self.bias_initializer)
                 if self.use_bias else None)

  def call(self, inputs):
    # `.value` (cast to the compute dtype under mixed precision, as the
    # variable itself would be) hands TensorFlow a tf.Variable it reads on
    # its fast path; a Keras variable takes the slow path in eager ops.
    outputs = tf.matmul(inputs, self.kernel.value)
    if self.use_bias:
      # BiasAdd is `+` broadcast on the last axis, bit for bit; its gradient
      # is one op, where `+`'s works out the broadcast first.
      outputs = tf.nn.bias_add(outputs, self.bias.value)
    return self.activation(outputs)

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.units,)

  def get_config(self):
    return {
        **super().get_config(),
        "units": self.units,
        "activation": keras.activations.serialize(self.activation),
        "use_bias": self.use_bias,
        "kernel_initializer": keras.initializers.serialize(
            self.kernel_initializer),
        "bias_initializer": keras.initializers.serialize(
            self.bias_initializer),
    }
