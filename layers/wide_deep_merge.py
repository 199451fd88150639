"""The merge of a wide & deep model (Cheng et al., 2016)."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="layers")
class WideDeepMerge(keras.layers.Layer):
  """Concatenates `[wide, deep]` on the feature axis.

  Inputs: `wide` `[batch, wide_features]`, `deep` `[batch, deep_features]`.
  Output: `[batch, wide_features + deep_features]`.
  """

  def build(self, input_shape):
    self._check_shapes(input_shape)

  def call(self, inputs):
    self._check_shapes([x.shape for x in inputs]
                       if isinstance(inputs, (list, tuple)) else inputs)
    wide, deep = inputs
    checks = []
    if wide.shape[0] is None or deep.shape[0] is None:
      checks.append(tf.debugging.assert_equal(
          tf.shape(wide)[0], tf.shape(deep)[0],
          message="WideDeepMerge: wide and deep batch sizes differ"))
    # In a graph the concat must wait for the check, or its own less clear
    # shape error may fire first.
    with tf.control_dependencies(checks):
      return tf.concat([wide, deep], axis=-1)

  def compute_output_shape(self, input_shape):
    wide_shape, deep_shape = self._check_shapes(input_shape)
    features = (None if wide_shape[1] is None or deep_shape[1] is None
                else wide_shape[1] + deep_shape[1])
    return (wide_shape[0], features)

  @staticmethod
  def _check_shapes(input_shape):
    """Returns `(wide_shape, deep_shape)` or raises a `ValueError`."""
    if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2 or (
        not all(isinstance(s, (list, tuple, tf.TensorShape))
                for s in input_shape)):
      raise ValueError("WideDeepMerge expects exactly two inputs [wide, deep], "
                       f"got {input_shape!r}.")
    wide_shape, deep_shape = (tuple(s) for s in input_shape)
    for name, shape in (("wide", wide_shape), ("deep", deep_shape)):
      if len(shape) != 2:
        raise ValueError(f"WideDeepMerge: {name} input must have rank 2 "
                         f"[batch, features], got shape {shape}.")
    if (wide_shape[0] is not None and deep_shape[0] is not None
        and wide_shape[0] != deep_shape[0]):
      raise ValueError(f"WideDeepMerge: wide and deep batch sizes differ: "
                       f"{wide_shape} vs {deep_shape}.")
    return wide_shape, deep_shape
