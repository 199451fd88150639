"""Batch normalization (Ioffe & Szegedy, 2015), interchangeable with Keras'."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="layers")
class BatchNormalization(keras.layers.Layer):
  """Normalizes `axis` with batch statistics in training, moving ones otherwise.

  Training (and trainable):
  `y = gamma * (x - mean_b) / sqrt(var_b + eps) + beta` with the biased batch
  moments over every axis but `axis`, and
  `moving = momentum * moving + (1 - momentum) * batch`, as Keras does.
  Inference: the same with `moving_mean` / `moving_variance`.
  Inputs and outputs: any shape; weights are `[input_shape[axis]]`.

  With `synchronized=True` the batch moments in training are those of the
  global batch: every replica of the current `tf.distribute` replica context
  normalizes (and updates the moving statistics) with the moments of all the
  replicas' inputs together, weighted by their example counts, so uneven
  shards give the moments of the concatenated batch. In a cross-replica
  context, or with one replica, it is the unsynchronized layer.

  In training the gradient is the closed form of batch normalization's
  (Ioffe & Szegedy, section 3), through the batch statistics:
  `dx = gamma / std * (dy - mean(dy) - x_hat * mean(dy * x_hat))`, with
  `x_hat` the normalized inputs. It is differentiable again, through the
  statistics too: second derivatives are exact (a gradient penalty's equal
  Keras'; Keras' layer cuts the gradient through the mean inside its
  variance, so its Hessian-vector products along most directions differ).

  Subclasses change which examples the statistics cover by overriding the
  hook `_batch_mean(values) -> [features]` (the forward and backward passes
  both reduce through it), and how the moving statistics follow the batch
  by overriding `_update_moving_statistics(mean, variance)`; both see
  tensors of the variables' dtype (float32 under the mixed precision
  policies).
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
    # Read here, outside the custom gradient, so that the tape sees them.
    weights = [tf.convert_to_tensor(weight.value)
               for weight in (self.gamma, self.beta) if weight is not None]
    if training and self.trainable:
      outputs = self._batch_normalized(inputs, *weights)
    else:
      outputs = self._normalized(
          inputs, self.moving_mean,
          tf.math.rsqrt(self.moving_variance + self.epsilon), *weights)
    return tf.cast(outputs, self.compute_dtype)

  def _normalized(self, inputs, mean, inverse_std, *weights):
    """`gamma * (inputs - mean) * inverse_std + beta`, as Keras computes it:
    one multiplier and one offset per feature."""
    gamma, beta = self._gamma_and_beta(weights)
    multiplier = inverse_std if gamma is None else inverse_std * gamma
    offset = -mean * multiplier
    if beta is not None:
      offset = offset + beta
    return (inputs * self._broadcastable(multiplier)
            + self._broadcastable(offset))

  def _gamma_and_beta(self, weights):
    weights = list(weights)
    gamma = weights.pop(0) if self.scale else None
    beta = weights.pop(0) if self.center else None
    return gamma, beta

  @tf.custom_gradient
  def _batch_normalized(self, inputs, *weights):
    """Normalized with the batch's statistics, towards which it moves the
    moving ones; differentiated in closed form.

    Differentiating the ops instead costs about forty gradient ops a layer,
    most of the layer's time in an eager step. The backward pass uses the
    forward pass's statistics: `tf.GradientTape` still watches the forward
    pass of a `tf.custom_gradient` (its documentation says so), so a tape
    recording the backward pass differentiates through them as well.
    """
    mean, variance = self._moments(inputs)
    self._update_moving_statistics(mean, variance)
    inverse_std = tf.math.rsqrt(variance + self.epsilon)
    outputs = self._normalized(inputs, mean, inverse_std, *weights)

    def gradient(upstream):
      gamma, _ = self._gamma_and_beta(weights)
      normalized = ((inputs - self._broadcastable(mean))
                    * self._broadcastable(inverse_std))
      upstream_normalized = upstream * normalized
      multiplier = inverse_std if gamma is None else inverse_std * gamma
      input_gradient = self._broadcastable(multiplier) * (
          upstream - self._broadcastable(self._batch_mean(upstream))
          - normalized * self._broadcastable(
              self._batch_mean(upstream_normalized)))
      # This replica's share: the optimizer sums the replicas' gradients.
      weight_gradients = []
      if self.scale:
        weight_gradients.append(
            tf.reduce_sum(upstream_normalized, self._reduction_axes))
      if self.center:
        weight_gradients.append(tf.reduce_sum(upstream, self._reduction_axes))
      return (input_gradient, *weight_gradients)

    return outputs, gradient

  def _broadcastable(self, statistic):
    """`statistic` `[features]` shaped to broadcast against the inputs: as
    it is for the last axis, where a reshape would only add ops (and their
    gradients) to an eager step."""
    if self._axis == len(self._broadcast_shape) - 1:
      return statistic
    return tf.reshape(statistic, self._broadcast_shape)

  def _moments(self, inputs):
    """Returns the batch `(mean, variance)`, each `[input_shape[axis]]`."""
    mean = self._batch_mean(inputs)
    # Biased variance about the mean (not E[x^2] - E[x]^2, which cancels
    # catastrophically when |mean| >> std).
    variance = self._batch_mean(tf.square(inputs - self._broadcastable(mean)))
    return mean, variance

  def _batch_mean(self, values):
    """The mean of `values` (shaped as the inputs) over every axis but
    `axis`: over this replica's batch, or, synchronized, over every
    replica's together.

    Synchronized, sums and counts are all-reduced, not per-replica means:
    replicas may hold different numbers of examples (a partial last batch),
    even none.
    """
    context = tf.distribute.get_replica_context()
    # With one replica the global batch is this one: the local mean is the
    # same number without the all-reduce's rounding.
    if not (self.synchronized and context is not None
            and context.num_replicas_in_sync > 1):
      return tf.reduce_mean(values, self._reduction_axes)
    local_count = tf.cast(tf.size(values) // tf.shape(values)[self._axis],
                          values.dtype)
    total, count = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        [tf.reduce_sum(values, self._reduction_axes), local_count])
    return total / count

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
