"""Batch normalization (Ioffe & Szegedy, 2015), interchangeable with Keras'."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="layers")
class BatchNormalization(keras.layers.Layer):
  """Normalizes `axis` with batch statistics in training, moving ones otherwise.

  Training (and trainable): `y = gamma * (x - mean_b) / sqrt(var_b + eps) + beta`
  with the biased batch moments over every axis but `axis`, and
  `moving = momentum * moving + (1 - momentum) * batch`, as Keras does.
  Inference: the same with `moving_mean` / `moving_variance`.
  Inputs and outputs: any shape; weights are `[input_shape[axis]]`.
  """

  def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True,
               scale=True, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= momentum <= 1.0:
      raise ValueError(
          f"BatchNormalization: momentum must be in [0, 1], got {momentum}.")
    if epsilon <= 0:
      raise ValueError(
          f"BatchNormalization: epsilon must be positive, got {epsilon}.")
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.center = center
    self.scale = scale

  def build(self, input_shape):
    rank = len(input_shape)
    if not -rank <= self.axis < rank:
      raise ValueError(
          f"BatchNormalization: axis {self.axis} is out of range for inputs "
          f"of shape {tuple(input_shape)}.")
    self._axis = self.axis % rank
    features = input_shape[self._axis]
    if features is None:
      raise ValueError(
          f"BatchNormalization: axis {self.axis} of inputs "
          f"{tuple(input_shape)} must have a known size.")
    self._reduction_axes = [i for i in range(rank) if i != self._axis]
    self._broadcast_shape = [1] * rank
    self._broadcast_shape[self._axis] = features
    shape = (features,)
    self.gamma = (self.add_weight(name="gamma", shape=shape,
                                  initializer="ones")
                  if self.scale else None)
    self.beta = (self.add_weight(name="beta", shape=shape, initializer="zeros")
                 if self.center else None)
    self.moving_mean = self.add_weight(
        name="moving_mean", shape=shape, initializer="zeros", trainable=False)
    self.moving_variance = self.add_weight(
        name="moving_variance", shape=shape, initializer="ones",
        trainable=False)

  def call(self, inputs, training=None):
    if training and self.trainable:
      mean = tf.reduce_mean(inputs, self._reduction_axes)
      # Biased variance about the mean (not E[x^2] - E[x]^2, which cancels
      # catastrophically when |mean| >> std).
      variance = tf.reduce_mean(
          tf.square(inputs - tf.reshape(mean, self._broadcast_shape)),
          self._reduction_axes)
      self.moving_mean.assign(
          self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
      self.moving_variance.assign(
          self.moving_variance * self.momentum
          + variance * (1.0 - self.momentum))
    else:
      mean, variance = self.moving_mean, self.moving_variance
    multiplier = tf.math.rsqrt(variance + self.epsilon)
    if self.scale:
      multiplier = multiplier * self.gamma
    offset = -mean * multiplier
    if self.center:
      offset = offset + self.beta
    return (inputs * tf.reshape(multiplier, self._broadcast_shape)
            + tf.reshape(offset, self._broadcast_shape))

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "axis": self.axis,
            "momentum": self.momentum, "epsilon": self.epsilon,
            "center": self.center, "scale": self.scale}
