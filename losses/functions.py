"""Per-example losses written from TensorFlow ops.

Each function returns one loss per example: shape `y_pred.shape[:-1]`.
Cross-entropies from logits go through a log-softmax / log-sum-exp that
subtracts the maximum logit, so logits of any magnitude give finite losses
and gradients. From probabilities they clip to `[eps, 1 - eps]` with Keras'
epsilon, as Keras does, so the two agree to float32 rounding.

float16 and bfloat16 predictions (a mixed precision model's outputs) are
computed on in float32, as Keras' `Loss` classes do: in float16 `1 - eps`
rounds to 1, so a clipped probability of 1 still gives `log(0)`, and the
logs and sums keep three digits. The logits behind a float16 softmax or
sigmoid, when found, are cast likewise.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf


def mean_squared_error(y_true, y_pred):
  """Mean over the last axis of `(y_true - y_pred)**2`.

  Args: `y_true`, `y_pred`: `[batch, ..., d]`; a trailing axis of size 1 on
  one side only is aligned as Keras does. Returns `[batch, ...]`.
  """
  y_pred = _at_least_float32(tf.convert_to_tensor(y_pred))
  y_true = tf.cast(y_true, y_pred.dtype)
  y_true, y_pred = align_ranks(y_true, y_pred)
  return tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)


def sparse_categorical_crossentropy(y_true, y_pred, from_logits=False):
  """`-log p[label]` for integer labels.

  Args:
    y_true: integer labels `[batch, ...]` (or `[batch, ..., 1]`), each in
      `[0, num_classes)`; checked eagerly with a `ValueError`.
    y_pred: probabilities or logits `[batch, ..., num_classes]`.
    from_logits: whether `y_pred` holds logits.
  Returns: `[batch, ...]`.
  """
  logits, from_logits = _logits_behind(
      tf.convert_to_tensor(y_pred), from_logits, "Softmax",
      "sparse_categorical_crossentropy")
  labels = tf.convert_to_tensor(y_true)
  if labels.shape.rank == logits.shape.rank and labels.shape[-1] == 1:
    labels = tf.squeeze(labels, axis=-1)
  if labels.shape.rank != logits.shape.rank - 1 or not (
      labels.shape.is_compatible_with(logits.shape[:-1])):
    raise ValueError(
        "sparse_categorical_crossentropy: labels must have shape "
        f"{logits.shape[:-1]} (y_pred without its class axis), got "
        f"{labels.shape}.")
  num_classes = logits.shape[-1]
  if tf.executing_eagerly():
    _check_labels(labels.numpy(), num_classes)
  if not from_logits:
    # Keras' treatment of probabilities: clip, take the log, renormalize.
    logits = tf.math.log(tf.clip_by_value(
        logits, keras.config.epsilon(), 1.0 - keras.config.epsilon()))
  return _sparse_cross_entropy(tf.cast(labels, tf.int64), logits)


@tf.custom_gradient
def _sparse_cross_entropy(labels, logits):
  """`-log_softmax(logits)[label]`, with its closed-form gradient
  `softmax - one_hot(label)`.

  Differentiating the ops instead costs about twenty gradient ops, a third
  of an eager training step of the course's network; a gather's gradient
  alone costs more than the forward pass. The gather stays in the forward
  pass: on the CPU it rejects a label outside the classes inside graphs too.
  """
  log_probs = log_softmax(logits)

  def gradient(upstream):
    classes = logits.shape[-1]  # eagerly a number; ops are what cost there
    if classes is None:
      classes = tf.shape(logits)[-1]
    one_hot = tf.one_hot(labels, classes, dtype=logits.dtype)
    return None, tf.expand_dims(upstream, -1) * (tf.exp(log_probs) - one_hot)
  picked = tf.gather(log_probs, labels, axis=-1,
                     batch_dims=labels.shape.rank)
  return -picked, gradient


def categorical_crossentropy(y_true, y_pred, from_logits=False,
                             label_smoothing=0.0):
  """`-sum(y_true * log p)` over the class axis.

  Args:
    y_true: class distributions (e.g. one-hot) `[batch, ..., num_classes]`.
    y_pred: probabilities or logits, same shape.
    from_logits: whether `y_pred` holds logits.
    label_smoothing: in [0, 1]; mixes `y_true` with the uniform distribution.
  Returns: `[batch, ...]`.
  """
  logits, from_logits = _logits_behind(tf.convert_to_tensor(y_pred),
                                       from_logits, "Softmax",
                                       "categorical_crossentropy")
  y_true = tf.cast(y_true, logits.dtype)
  _check_same_shape("categorical_crossentropy", y_true, logits)
  y_true = _smooth_labels(y_true, label_smoothing,
                          tf.cast(tf.shape(y_true)[-1], logits.dtype))
  if from_logits:
    return -tf.reduce_sum(y_true * log_softmax(logits), axis=-1)
  probs = logits / tf.reduce_sum(logits, axis=-1, keepdims=True)
  probs = tf.clip_by_value(probs, keras.config.epsilon(),
                           1.0 - keras.config.epsilon())
  return -tf.reduce_sum(y_true * tf.math.log(probs), axis=-1)


def binary_crossentropy(y_true, y_pred, from_logits=False,
                        label_smoothing=0.0):
  """Mean over the last axis of `-(z log p + (1 - z) log(1 - p))`.

  Args:
    y_true: targets in [0, 1], `[batch, ..., d]`.
    y_pred: probabilities or logits, same shape.
    from_logits: whether `y_pred` holds logits.
    label_smoothing: in [0, 1]; pulls targets towards 0.5.
  Returns: `[batch, ...]`.
  """
  logits, from_logits = _logits_behind(tf.convert_to_tensor(y_pred),
                                       from_logits, "Sigmoid",
                                       "binary_crossentropy")
  y_true = tf.cast(y_true, logits.dtype)
  _check_same_shape("binary_crossentropy", y_true, logits)
  y_true = _smooth_labels(y_true, label_smoothing, 2.0)
  if from_logits:
    # log(1 + exp(x)) - z x, rearranged so that exp never overflows. `where`
    # rather than relu/abs: their zero subgradient at x = 0 would make the
    # gradient there -z instead of the true sigmoid(0) - z.
    positive = logits >= 0
    elementwise = (tf.where(positive, logits, tf.zeros_like(logits))
                   - logits * y_true
                   + tf.math.log1p(tf.exp(tf.where(positive, -logits,
                                                   logits))))
  else:
    probs = tf.clip_by_value(logits, keras.config.epsilon(),
                             1.0 - keras.config.epsilon())
    elementwise = -(y_true * tf.math.log(probs)
                    + (1.0 - y_true) * tf.math.log(1.0 - probs))
  return tf.reduce_mean(elementwise, axis=-1)


def log_softmax(logits):
  """`logits - logsumexp(logits)` on the last axis, shifted by the maximum.

  The shift is a constant for the gradient, which is then exactly
  `one_hot - softmax`, finite for logits of any size.
  """
  shifted = logits - tf.stop_gradient(
      tf.reduce_max(logits, axis=-1, keepdims=True))
  return shifted - tf.math.log(
      tf.reduce_sum(tf.exp(shifted), axis=-1, keepdims=True))


def align_ranks(y_true, y_pred):
  """Squeezes or expands a trailing size-1 axis so the ranks match (Keras'
  rule): `[batch]` against `[batch, 1]` becomes `[batch, 1]` on both sides."""
  true_rank, pred_rank = y_true.shape.rank, y_pred.shape.rank
  if true_rank == pred_rank + 1 and y_true.shape[-1] == 1:
    if pred_rank == 1:
      y_pred = tf.expand_dims(y_pred, -1)
    else:
      y_true = tf.squeeze(y_true, -1)
  elif pred_rank == true_rank + 1 and y_pred.shape[-1] == 1:
    if true_rank == 1:
      y_true = tf.expand_dims(y_true, -1)
    else:
      y_pred = tf.squeeze(y_pred, -1)
  return y_true, y_pred


def _logits_behind(y_pred, from_logits, activation_op, loss_name):
  """Returns `(tensor, from_logits)`, preferring the logits of an activation,
  the tensor in at least float32.

  Keras marks softmax/sigmoid outputs with the logits they came from (and in
  graphs the producing op shows them). Using those logits is what keeps the
  loss and its gradient finite when a probability underflows to 0. They are
  looked for before the cast to float32, which would hide them.
  """
  logits = getattr(y_pred, "_keras_logits", None)
  if logits is None:
    op = getattr(y_pred, "op", None) if not tf.executing_eagerly() else None
    if op is not None and op.type == activation_op:
      logits = op.inputs[0]
  if logits is None:
    return _at_least_float32(y_pred), from_logits
  if from_logits:
    warnings.warn(f"{loss_name}: from_logits=True, but y_pred is the output "
                  f"of a {activation_op}; using the logits behind it.",
                  stacklevel=3)
  return _at_least_float32(logits), True


def _at_least_float32(tensor):
  if tensor.dtype in (tf.float16, tf.bfloat16):
    return tf.cast(tensor, tf.float32)
  return tensor


def _check_labels(labels, num_classes):
  bad = labels[(labels < 0) | (labels >= num_classes)
               | (labels != np.floor(labels))]
  if bad.size:
    examples = np.unique(bad)[:5]
    if np.all(examples == np.floor(examples)):  # Loss.__call__ made them float
      examples = examples.astype(np.int64)
    raise ValueError(
        f"sparse_categorical_crossentropy: labels must be integers in "
        f"[0, {num_classes}) for y_pred with {num_classes} classes; got "
        f"{bad.size} outside, e.g. {examples.tolist()}.")


def _check_same_shape(loss_name, y_true, y_pred):
  if not y_true.shape.is_compatible_with(y_pred.shape):
    raise ValueError(f"{loss_name}: y_true and y_pred must have the same "
                     f"shape, got {y_true.shape} and {y_pred.shape}.")


def _smooth_labels(y_true, label_smoothing, num_classes):
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(
        f"label_smoothing must be in [0, 1], got {label_smoothing}.")
  if not label_smoothing:
    return y_true
  return y_true * (1.0 - label_smoothing) + label_smoothing / num_classes
