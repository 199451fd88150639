"""Mixed precision in the custom loops against model.fit: the global dtype
policies over a model of our layers, and loss scaling with a
`LossScaleOptimizer` (scaled loss, unscaled gradients, skipped overflowing
steps, a lowered scale, checkpointed and resumed).

Each layer under each policy against Keras' own layer, and a model of every
layer under each global policy, are in `test_layers`; the losses' float32
computation is in `test_losses`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from layer_harness import global_dtype_policy
from loop_models import (CUSTOM_LOOPS, assert_same_run, classifier,
                         max_weight_difference, run_loop)


def _loss_scaled_sgd(made, **kwargs):
  """An `optimizer_fn` whose optimizers are appended to `made`, so a test
  can read the loss scale each run ended with."""
  def optimizer_fn():
    made.append(keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), **kwargs))
    return made[-1]
  return optimizer_fn


def _run(loop, policy, optimizer_fn, epochs, **kwargs):
  """Dense -> BatchNorm -> Dense softmax under `policy`, without dropout
  (fit's masks are not ours to compare), on weighted data."""
  with global_dtype_policy(policy):
    return run_loop(loop, epochs=epochs, model_fn=classifier,
                    optimizer_fn=optimizer_fn, **kwargs)


@pytest.fixture(scope="module")
def float16_fit():
  made = []
  return _run("keras_fit", "mixed_float16", _loss_scaled_sgd(made), 3), made


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_mixed_float16_with_loss_scaling_trains_as_fit(loop, float16_fit):
  fit, fit_optimizers = float16_fit
  made = []
  history = _run(loop, "mixed_float16", _loss_scaled_sgd(made), 3)
  model = history.model
  assert model.layers[0].compute_dtype == "float16"
  assert {v.dtype for v in model.weights} == {"float32"}
  losses = history.history["loss"]
  assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
  # The same float16 ops in the same order as fit's step, the eager loop's
  # included: the same weights to the bit.
  assert max_weight_difference(history, fit) == 0.0
  # Loss scaling ran: the default 2**15 overflowed at least once, as in fit.
  scale = made[-1].dynamic_scale.numpy()
  assert scale == fit_optimizers[-1].dynamic_scale.numpy() < 2.0**15


@pytest.mark.parametrize("loop,tolerance", [
    ("function", 0.0), ("graph", 0.0),
    # Eagerly each op is a kernel of its own; a compiled step's graph may
    # be fused by TensorFlow's optimizer (oneDNN on this CPU), which rounds
    # bfloat16 intermediates differently: after 8 SGD steps the weights
    # part by 3.6e-3, under one bfloat16 step at 1 (2**-7).
    ("eager", 5e-3)])
def test_mixed_bfloat16_trains_as_fit(loop, tolerance):
  sgd = lambda: keras.optimizers.SGD(0.1)
  fit = _run("keras_fit", "mixed_bfloat16", sgd, 2)
  history = _run(loop, "mixed_bfloat16", sgd, 2)
  assert history.model.layers[0].compute_dtype == "bfloat16"
  assert max_weight_difference(history, fit) <= tolerance


def test_overflowing_steps_are_skipped_and_lower_the_scale_as_in_fit(
    tmp_path):
  """With a loss scale of 2**40 every float16 gradient overflows: each of
  the 2 epochs' 4 steps is skipped and halves the scale."""
  runs = {}
  for loop in ("keras_fit", *CUSTOM_LOOPS):
    made = []
    runs[loop] = (_run(loop, "mixed_float16",
                       _loss_scaled_sgd(made, initial_scale=2.0**40), 2,
                       checkpoint_dir=tmp_path / loop),
                  made[-1])
  keras.utils.set_random_seed(3)  # run_loop's seed: the initial weights
  initial = classifier().trainable_weights
  for loop, (history, optimizer) in runs.items():
    assert optimizer.dynamic_scale.numpy() == 2.0**32, loop
    assert optimizer.iterations.numpy() == 0, loop
    # The optimizer's step stood still; epoch 1's checkpoint did not
    # overwrite epoch 0's.
    saved = tf.train.get_checkpoint_state(tmp_path / loop)
    assert len(saved.all_model_checkpoint_paths) == 2, loop
    for weight, start in zip(history.model.trainable_weights, initial):
      np.testing.assert_array_equal(weight, start, err_msg=loop)
    # The forward passes still moved BatchNorm's statistics, as in fit.
    assert_same_run(history, runs["keras_fit"][0], rtol=1e-5)


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_resume_restores_the_loss_scale(loop, tmp_path):
  """A scale of 2**17 overflows in 3 of epoch 0's 4 steps, then doubles
  every 3 good steps and overflows again: a resumed run that started over
  from 2**17, or lost the count of good steps, would skip other steps than
  the uninterrupted one."""
  def run(epochs, checkpoint_dir=None):
    made = []
    history = _run(loop, "mixed_float16",
                   _loss_scaled_sgd(made, initial_scale=2.0**17,
                                    dynamic_growth_steps=3),
                   epochs, checkpoint_dir=checkpoint_dir)
    return history, made[-1]

  uninterrupted, optimizer = run(3)
  _, stopped = run(1, tmp_path)
  assert stopped.dynamic_scale.numpy() < 2.0**17
  assert stopped.step_counter.numpy() > 0
  resumed, restored = run(3, tmp_path)
  assert resumed.epochs == [0, 1, 2]
  # Epochs 1 and 2 trained here (4 steps each), from the checkpoint.
  assert (resumed.resumed_from, resumed.steps_trained) == (
      {"epoch": 1, "step": 0}, 8)
  for variable in ("dynamic_scale", "step_counter", "iterations"):
    assert (getattr(restored, variable).numpy()
            == getattr(optimizer, variable).numpy()), variable
  assert_same_run(resumed, uninterrupted, rtol=1e-6)
