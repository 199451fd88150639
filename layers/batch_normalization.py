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

  With `synchronized=True` the batch moments in training are those of the
  global batch: every replica of the current `tf.distribute` replica context
  normalizes (and updates the moving statistics) with the moments of all the
  replicas' inputs together, weighted by their example counts, so uneven
  shards give the moments of the concatenated batch. In a cross-replica
  context, or with one replica, it is the unsynchronized layer.

  Subclasses change how statistics are computed by overriding the hooks
  `_moments(inputs) -> (mean, variance)` and
  `_update_moving_statistics(mean, variance)`; both see tensors of the
  variables' dtype (float32 under the mixed precision policies).
  """

  def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True,
               scale=True, synchronized=False, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= momentum <= 1.0:
      raise ValueError(
          f"BatchNormalization: momentum must be in [0, 1], got {momentum}.")
    if epsilon <= 0:
      raise ValueError(
          f"BatchNormalization: epsilon must be positive, got {epsilon}.")
    if not isinstance(synchronized, bool):
      raise ValueError(f"BatchNormalization: synchronized must be True or "
                       f"False, got {synchronized!r}.")
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.center = center
    self.scale = scale
    self.synchronized = synchronized

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
    # Not autocast: `call` computes in the variables' dtype.
    self.gamma = (self.add_weight(name="gamma", shape=shape,
                                  initializer="ones", autocast=False)
                  if self.scale else None)
    self.beta = (self.add_weight(name="beta", shape=shape, initializer="zeros",
                                 autocast=False)
                 if self.center else None)
    self.moving_mean = self.add_weight(
        name="moving_mean", shape=shape, initializer="zeros", trainable=False,
        autocast=False)
    self.moving_variance = self.add_weight(
        name="moving_variance", shape=shape, initializer="ones",
        trainable=False, autocast=False)

  def call(self, inputs, training=None):
    # As Keras' layer: under a mixed policy, float16 and bfloat16 inputs are
    # normalized in the variables' float32, since their squares overflow
    # (float16) or their moments keep few digits; the output is cast back.
    inputs = tf.cast(inputs, self.variable_dtype)
    if training and self.trainable:
      mean, variance = self._moments(inputs)
      self._update_moving_statistics(mean, variance)
    else:
      mean, variance = self.moving_mean, self.moving_variance
    multiplier = tf.math.rsqrt(variance + self.epsilon)
    if self.scale:
      multiplier = multiplier * self.gamma.value
    offset = -mean * multiplier
    if self.center:
      offset = offset + self.beta.value
    outputs = (inputs * self._broadcastable(multiplier)
               + self._broadcastable(offset))
    return tf.cast(outputs, self.compute_dtype)

  def _broadcastable(self, statistic):
    """`statistic` `[features]` shaped to broadcast against the inputs: as
    it is for the last axis, where a reshape would only add ops (and their
    gradients) to an eager step."""
    if self._axis == len(self._broadcast_shape) - 1:
      return statistic
    return tf.reshape(statistic, self._broadcast_shape)

  def _moments(self, inputs):
    """Returns the batch `(mean, variance)`, each `[input_shape[axis]]`."""
    context = tf.distribute.get_replica_context()
    # With one replica the global batch is this one: the local moments are
    # the same numbers without the all-reduces' rounding.
    if (self.synchronized and context is not None
        and context.num_replicas_in_sync > 1):
      return self._global_moments(inputs, context)
    mean = tf.reduce_mean(inputs, self._reduction_axes)
    # Biased variance about the mean (not E[x^2] - E[x]^2, which cancels
    # catastrophically when |mean| >> std).
    variance = tf.reduce_mean(tf.square(inputs - self._broadcastable(mean)),
                              self._reduction_axes)
    return mean, variance

  def _global_moments(self, inputs, context):
    """The moments of every replica's `inputs` together.

    Sums and counts are all-reduced, not per-replica means: replicas may hold
    different numbers of examples (a partial last batch), even none. The
    variance is a second pass about the global mean, as in `_moments`.
    """
    local_count = tf.cast(tf.size(inputs) // tf.shape(inputs)[self._axis],
                          inputs.dtype)
    total, count = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        [tf.reduce_sum(inputs, self._reduction_axes), local_count])
    mean = total / count
    squared_deviations = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.reduce_sum(tf.square(inputs - self._broadcastable(mean)),
                      self._reduction_axes))
    return mean, squared_deviations / count

  def _update_moving_statistics(self, mean, variance):
    """Moves the moving statistics towards a batch's `mean` and `variance`."""
    # Arithmetic on the values: on a Keras variable it takes Keras ops'
    # slow path in every eager step. The assignment stays the variable's
    # (a Keras stateless scope collects it).
    for moving, batch in ((self.moving_mean, mean),
                          (self.moving_variance, variance)):
      moving.assign(moving.value * self.momentum
                    + batch * (1.0 - self.momentum))

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "axis": self.axis,
            "momentum": self.momentum, "epsilon": self.epsilon,
            "center": self.center, "scale": self.scale,
            "synchronized": self.synchronized}
