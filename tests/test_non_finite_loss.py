"""A NaN or Inf loss stops every loop, naming where, and the last
checkpoint stays the last good state."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import layers
import training_loops
from training_loops.checkpoints import RunCheckpoint
from loop_models import classification_data, run_loop


class _NaNAfter(keras.layers.Layer):
  """The identity until its `calls`-th training call, then NaN."""

  def __init__(self, calls, **kwargs):
    super().__init__(**kwargs)
    self.calls = calls

  def build(self, input_shape):
    self.count = self.add_weight(shape=(), initializer="zeros",
                                 trainable=False, name="count")

  def call(self, inputs, training=None):
    if not training:
      return inputs
    self.count.assign_add(1.0)
    poison = tf.where(tf.equal(self.count, float(self.calls)), np.nan, 0.0)
    return inputs + poison


@pytest.mark.parametrize("loop, jit_compile", [
    *((loop, False) for loop in training_loops.LOOPS), ("graph", True)])
def test_non_finite_loss_names_epoch_and_step_and_keeps_checkpoint(
    loop, jit_compile, tmp_path):
  def model_fn():  # 4 steps an epoch: the 7th call is epoch 1, step 3
    return keras.Sequential([keras.Input((4,)), _NaNAfter(7),
                             layers.Dense(3, "softmax")])

  # With XLA, static shapes (4 batches of 12) for the graph loop's chunks.
  data = (classification_data(examples=48, batch_size=12,
                              drop_remainder=True) if jit_compile else None)
  where = ("model.fit reports no step" if loop == "keras_fit"
           else "step 3 of that epoch")
  with pytest.raises(training_loops.NonFiniteLossError,
                     match=rf"nan at epoch 1 \(0-based\), {where}"):
    run_loop(loop, epochs=3, data=data, model_fn=model_fn,
             checkpoint_dir=tmp_path, jit_compile=jit_compile)
  model, optimizer = model_fn(), keras.optimizers.SGD()
  optimizer.build(model.trainable_variables)
  objects = {"model_variables": list(model.variables),
             "optimizer": optimizer}
  position = RunCheckpoint(tmp_path, model, objects,
                           tf.distribute.get_strategy(),
                           training_loops.History()).restore()
  # After epoch 0 (4 steps), not the poisoned epoch 1.
  assert position == (1, 0, 4)
  assert all(np.all(np.isfinite(w)) for w in model.get_weights())
