"""Gradient clipping on several replicas.

The custom loops clip the gradient summed over the replicas, so a mirrored
run equals a one-replica run. Keras' optimizer, as `model.fit` runs it,
clips each replica's share before the sum (tensorflow/tensorflow#33929), so
fit's mirrored run differs from its one-replica run: a known difference.
"""

import keras
import pytest
import tensorflow as tf

import losses
from loop_models import (CUSTOM_LOOPS, classification_data, classifier,
                         max_weight_difference, run_loop)


CLIP_NORM, CLIP_VALUE = 0.05, 0.01
OPTIMIZERS = {
    "global_clipnorm": lambda: keras.optimizers.SGD(
        0.1, global_clipnorm=CLIP_NORM),
    "clipnorm": lambda: keras.optimizers.SGD(0.1, clipnorm=CLIP_NORM),
    "clipvalue": lambda: keras.optimizers.SGD(0.1, clipvalue=CLIP_VALUE),
    # Clipped by the inner optimizer after the loss scale is divided out.
    "loss_scaled_global_clipnorm": lambda: (
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(
            0.1, global_clipnorm=CLIP_NORM))),
}


def _run(loop, optimizer, strategy=None):
  """Without BatchNorm and Dropout, whose per-replica statistics and masks
  differ from one replica's anyway; 50 examples in batches of 16, so each
  epoch ends with a batch of 2 that two replicas split 1 + 1."""
  return run_loop(loop, model_fn=lambda: classifier(batch_norm=False),
                  optimizer_fn=OPTIMIZERS[optimizer], strategy=strategy)


def test_every_clip_is_active_from_the_first_step():
  keras.utils.set_random_seed(3)  # run_loop's seed: the initial weights
  model = classifier(batch_norm=False)
  x, y, weights = next(iter(classification_data(sample_weights=True)))
  with tf.GradientTape() as tape:
    loss = losses.SparseCategoricalCrossentropy()(
        y, model(x, training=True), sample_weight=weights)
  gradients = tape.gradient(loss, model.trainable_variables)
  assert tf.linalg.global_norm(gradients) > 10 * CLIP_NORM
  assert min(tf.norm(g) for g in gradients) > 5 * CLIP_NORM
  assert max(tf.reduce_max(tf.abs(g)) for g in gradients) > 10 * CLIP_VALUE


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_custom_loops_clip_the_sum_so_two_replicas_equal_one(loop, optimizer,
                                                             mirrored):
  single = _run(loop, optimizer)
  replicated = _run(loop, optimizer, mirrored)
  assert max_weight_difference(replicated, single) < 1e-5


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_keras_fit_clips_each_replicas_share_so_two_replicas_differ(
    optimizer, mirrored):
  single = _run("keras_fit", optimizer)
  replicated = _run("keras_fit", optimizer, mirrored)
  assert max_weight_difference(replicated, single) > 1e-3
