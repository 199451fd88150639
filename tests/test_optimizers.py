"""research.framework.optimizers: the schedules against closed forms, each
optimizer's steps through `training_loops.train` against NumPy updates from
the same weights and tape gradients, the global clip norm, moving averages,
gradient accumulation, loss scaling, `Warmup`'s serialization, and every
refusal of `check`.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from conftest import saved_and_loaded
from layer_harness import global_dtype_policy
from loop_models import (assert_same_run, classification_data, classifier,
                         run_loop)
from research.framework import optimizers, run_config

LR, DECAY = 0.1, 0.05
SCHEDULES = keras.optimizers.schedules


def _config(**values):
  """The shared config: every field at its default, optimizer sgd at
  learning rate LR (the experiment's defaults), then `values`."""
  return run_config.RunConfig(**{"optimizer": "sgd", "learning_rate": LR,
                                 **values})


# -- schedules ---------------------------------------------------------------

def _warmed(warmup, after):
  """The closed form of a linear warm-up from 0 to `after(0)`, then
  `after` counted from its end."""
  return lambda step: (after(0) * step / warmup if step < warmup
                       else after(step - warmup))


def _exponential(decay_steps, rate):
  return lambda step: LR * rate ** (step / decay_steps)


def _piecewise(boundaries, values):
  return lambda step: values[sum(step > b for b in boundaries)]


def _cosine(decay_steps):
  return lambda step: 0.5 * LR * (1 + math.cos(
      math.pi * min(step, decay_steps) / decay_steps))


PIECES = {"lr_boundaries": [3, 6], "lr_values": [0.3, 0.2, 0.1]}
# A run of 2 epochs of 10 steps: (flags, schedule class, closed form, steps).
SCHEDULE_CASES = {
    "constant_warmup": ({"warmup_steps": 4}, optimizers.Warmup,
                        _warmed(4, lambda step: LR), (0, 1, 2, 4, 19)),
    "exponential": ({"lr_schedule": "exponential", "decay_steps": 5,
                     "decay_rate": 0.5}, SCHEDULES.ExponentialDecay,
                    _exponential(5, 0.5), (0, 3, 5, 12, 19)),
    # decay_steps: one epoch.
    "exponential_warmup": ({"lr_schedule": "exponential", "warmup_steps": 4,
                            "decay_rate": 0.5}, optimizers.Warmup,
                           _warmed(4, _exponential(10, 0.5)),
                           (0, 2, 4, 9, 14, 19)),
    "piecewise": ({"lr_schedule": "piecewise", **PIECES},
                  SCHEDULES.PiecewiseConstantDecay,
                  _piecewise((3, 6), (0.3, 0.2, 0.1)), (0, 3, 4, 6, 7, 19)),
    "piecewise_warmup": ({"lr_schedule": "piecewise", "warmup_steps": 2,
                          **PIECES}, optimizers.Warmup,
                         _warmed(2, _piecewise((3, 6), (0.3, 0.2, 0.1))),
                         (0, 1, 2, 5, 6, 8, 9, 19)),
    # decay_steps: the rest of the run.
    "cosine": ({"lr_schedule": "cosine"}, SCHEDULES.CosineDecay,
               _cosine(20), (0, 5, 10, 19, 20, 25)),
    "cosine_warmup": ({"lr_schedule": "cosine", "warmup_steps": 4},
                      SCHEDULES.CosineDecay, _warmed(4, _cosine(16)),
                      (0, 2, 4, 12, 19, 20, 25)),
    "cosine_warmup_decay_steps": ({"lr_schedule": "cosine",
                                   "warmup_steps": 4, "decay_steps": 8},
                                  SCHEDULES.CosineDecay,
                                  _warmed(4, _cosine(8)), (0, 3, 8, 12, 19)),
}


def test_a_constant_rate_without_warmup_is_a_float():
  rate = optimizers.learning_rate(_config(), 10, 2)
  assert isinstance(rate, float) and rate == LR


@pytest.mark.parametrize("case", SCHEDULE_CASES)
def test_schedules_match_their_closed_forms(case):
  flags, kind, expected, steps = SCHEDULE_CASES[case]
  schedule = optimizers.learning_rate(_config(**flags), 10, 2)
  assert type(schedule) is kind
  # The optimizer calls it with its int64 step counter.
  rates = [float(schedule(tf.constant(step, tf.int64))) for step in steps]
  np.testing.assert_allclose(rates, [expected(step) for step in steps],
                             rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("after", [
    LR, SCHEDULES.ExponentialDecay(LR, 5, 0.5),
    SCHEDULES.PiecewiseConstantDecay([3, 6], [0.3, 0.2, 0.1])],
    ids=["float", "exponential", "piecewise"])
def test_warmup_round_trips_through_keras_serialization(after):
  warmup = optimizers.Warmup(4, after)
  restored = SCHEDULES.deserialize(SCHEDULES.serialize(warmup))
  assert type(restored) is optimizers.Warmup
  assert restored.get_config() == warmup.get_config()
  steps = tf.range(12, dtype=tf.int64)
  np.testing.assert_array_equal(
      [float(restored(step)) for step in steps],
      [float(warmup(step)) for step in steps])


def test_a_model_compiled_with_warmup_saves_and_loads(tmp_path):
  config = _config(optimizer="adam", lr_schedule="exponential",
                   warmup_steps=1, decay_steps=2, decay_rate=0.5)
  history = _train(config, batches=2)
  loaded = saved_and_loaded(history.model, tmp_path)
  trained = history.model.optimizer
  schedule = loaded.optimizer.get_config()["learning_rate"]
  assert schedule["registered_name"] == "research>Warmup"
  assert schedule == trained.get_config()["learning_rate"]
  # The step counter came back, so the schedule continues where it was.
  assert int(loaded.optimizer.iterations) == int(trained.iterations) == 2
  assert float(loaded.optimizer.learning_rate) == pytest.approx(
      LR * 0.5 ** 0.5)
  for restored, variable in zip(loaded.optimizer.variables,
                                trained.variables):
    np.testing.assert_array_equal(restored, variable)


# -- optimizers --------------------------------------------------------------

def _model():
  return classifier(batch_norm=False)


def _batches(count):
  """`count` unshuffled batches of 16 unweighted examples."""
  return classification_data(examples=16 * count, batch_size=16)


def _train(config, batches, loop="graph", **kwargs):
  """`optimizers.optimizer_fn(config, ...)` trained through `train` on
  `_batches(batches)`, one epoch."""
  return run_loop(loop, epochs=1, model_fn=_model,
                  optimizer_fn=optimizers.optimizer_fn(config, batches, 1),
                  data=_batches(batches), **kwargs)


def _reference(update, batches):
  """The weights after `update(weights, gradients, step)` (NumPy, float64)
  on each of `_batches(batches)` in turn, from the weights `train` starts
  from, each gradient taken by a tape at the current weights."""
  keras.utils.set_random_seed(3)  # run_loop's seed: the initial weights
  model = _model()
  weights = [w.numpy().astype(np.float64) for w in model.trainable_weights]
  for step, (x, y) in enumerate(_batches(batches)):
    for variable, value in zip(model.trainable_weights, weights):
      variable.assign(value.astype(np.float32))
    with tf.GradientTape() as tape:
      loss = losses.SparseCategoricalCrossentropy()(y, model(x, training=True))
    gradients = [g.numpy().astype(np.float64) for g in
                 tape.gradient(loss, model.trainable_weights)]
    weights = update(weights, gradients, step)
  return weights


def _decayed(weight, weight_decay, lr=LR):
  # Keras decays the weights before the update, with the step's rate.
  return weight * (1 - lr * weight_decay)


def _sgd(weight_decay, momentum=0.0, nesterov=False):
  velocities = {}

  def update(weights, gradients, step):
    del step
    new = []
    for i, (w, g) in enumerate(zip(weights, gradients)):
      velocities[i] = momentum * velocities.get(i, 0.0) - LR * g
      change = (momentum * velocities[i] - LR * g if nesterov
                else velocities[i])
      new.append(_decayed(w, weight_decay) + change)
    return new
  return update


def _adam(weight_decay, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
  first, second = {}, {}

  def update(weights, gradients, step):
    t = step + 1
    alpha = LR * math.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
    new = []
    for i, (w, g) in enumerate(zip(weights, gradients)):
      first[i] = beta_1 * first.get(i, 0.0) + (1 - beta_1) * g
      second[i] = beta_2 * second.get(i, 0.0) + (1 - beta_2) * g * g
      new.append(_decayed(w, weight_decay)
                 - alpha * first[i] / (np.sqrt(second[i]) + epsilon))
    return new
  return update


def _rmsprop(weight_decay, rho=0.9, epsilon=1e-7):
  velocities = {}

  def update(weights, gradients, step):
    del step
    new = []
    for i, (w, g) in enumerate(zip(weights, gradients)):
      velocities[i] = rho * velocities.get(i, 0.0) + (1 - rho) * g * g
      new.append(_decayed(w, weight_decay)
                 - LR * g / np.sqrt(velocities[i] + epsilon))
    return new
  return update


def _adagrad(weight_decay, initial=0.1, epsilon=1e-7):
  sums = {}

  def update(weights, gradients, step):
    del step
    new = []
    for i, (w, g) in enumerate(zip(weights, gradients)):
      sums[i] = sums.get(i, initial) + g * g
      new.append(_decayed(w, weight_decay)
                 - LR * g / np.sqrt(sums[i] + epsilon))
    return new
  return update


# flags -> (Keras class, the NumPy update); two steps, so momentum and
# Adam's bias correction show beyond the first.
OPTIMIZER_CASES = {
    "sgd": ({"optimizer": "sgd"}, keras.optimizers.SGD, lambda: _sgd(0.0)),
    "sgd_decayed": ({"optimizer": "sgd", "weight_decay": DECAY},
                    keras.optimizers.SGD, lambda: _sgd(DECAY)),
    "momentum": ({"optimizer": "momentum", "momentum": 0.8,
                  "weight_decay": DECAY}, keras.optimizers.SGD,
                 lambda: _sgd(DECAY, momentum=0.8)),
    # momentum: 0.9 by default.
    "nesterov": ({"optimizer": "nesterov", "weight_decay": DECAY},
                 keras.optimizers.SGD,
                 lambda: _sgd(DECAY, momentum=0.9, nesterov=True)),
    "adam": ({"optimizer": "adam", "weight_decay": DECAY},
             keras.optimizers.Adam, lambda: _adam(DECAY)),
    "adamw": ({"optimizer": "adamw", "weight_decay": DECAY},
              keras.optimizers.AdamW, lambda: _adam(DECAY)),
    "adamw_undecayed": ({"optimizer": "adamw"}, keras.optimizers.AdamW,
                        lambda: _adam(0.0)),
    "rmsprop": ({"optimizer": "rmsprop", "weight_decay": DECAY},
                keras.optimizers.RMSprop, lambda: _rmsprop(DECAY)),
    "adagrad": ({"optimizer": "adagrad", "weight_decay": DECAY},
                keras.optimizers.Adagrad, lambda: _adagrad(DECAY)),
}


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_each_optimizer_steps_as_its_closed_form(case):
  flags, kind, update = OPTIMIZER_CASES[case]
  history = _train(_config(**flags), batches=2)
  optimizer = history.model.optimizer
  assert type(optimizer) is kind
  assert optimizer.weight_decay == (flags.get("weight_decay") or (
      0.0 if kind is keras.optimizers.AdamW else None))
  # Adam and RMSprop divide tiny gradients by their tiny norms, which
  # magnifies float32 rounding: 1e-4 of a step of LR.
  for weight, expected in zip(history.model.trainable_weights,
                              _reference(update(), batches=2)):
    np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=1e-4 * LR)


def test_each_call_builds_a_new_optimizer_with_the_flags_options():
  build = optimizers.optimizer_fn(
      _config(optimizer="adam", clipnorm=1.5, ema_momentum=0.9,
              gradient_accumulation_steps=3, lr_schedule="cosine"), 10, 2)
  optimizer = build()
  assert build() is not optimizer
  assert optimizer.global_clipnorm == 1.5 and optimizer.clipnorm is None
  assert optimizer.use_ema and optimizer.ema_momentum == 0.9
  assert optimizer.gradient_accumulation_steps == 3
  plain = optimizers.optimizer_fn(_config(), 10, 2)()
  assert plain.global_clipnorm is None and not plain.use_ema
  assert plain.gradient_accumulation_steps is None


def test_clipnorm_clips_the_global_norm_of_all_gradients():
  clip = 0.01

  def clipped(weights, gradients, step):
    del step
    norm = math.sqrt(sum(np.sum(g * g) for g in gradients))
    # Active, and on each variable it would clip otherwise.
    assert min(np.linalg.norm(g) for g in gradients) > 10 * clip
    return [w - LR * g * clip / norm for w, g in zip(weights, gradients)]

  history = _train(_config(clipnorm=clip), batches=1)
  for weight, expected in zip(history.model.trainable_weights,
                              _reference(clipped, batches=1)):
    np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=1e-7)


def test_ema_momentum_ends_training_on_the_moving_average():
  momentum, trained, averages = 0.5, [], []
  sgd = _sgd(0.0)

  def averaged(weights, gradients, step):
    weights = sgd(weights, gradients, step)
    trained[:] = weights
    # Keras' first average is the weights themselves.
    averages[:] = weights if step == 0 else [
        momentum * a + (1 - momentum) * w for a, w in zip(averages, weights)]
    return weights

  history = _train(_config(ema_momentum=momentum), batches=2)
  _reference(averaged, batches=2)
  for weight, average, last in zip(history.model.trainable_weights,
                                   averages, trained):
    np.testing.assert_allclose(weight, average, rtol=1e-5, atol=1e-7)
    assert np.max(np.abs(average - last)) > 1e-4


def test_gradient_accumulation_applies_one_update_per_two_batches():
  """With a warm-up of 3 steps the updates after batches 1 and 3 (0-based)
  take the rates of steps 1 and 3: the schedule counts batches, while
  `iterations` counts updates."""
  pending = []

  def accumulated(weights, gradients, step):
    pending.append(gradients)
    if len(pending) < 2:
      return weights
    rate = LR * min(step / 3, 1.0)
    mean = [(a + b) / 2 for a, b in zip(*pending)]
    pending.clear()
    return [w - rate * g for w, g in zip(weights, mean)]

  config = _config(gradient_accumulation_steps=2, warmup_steps=3)
  optimizers.check(config, steps_per_epoch=4, epochs=1)
  history = _train(config, batches=4)
  assert int(history.model.optimizer.iterations) == 2
  for weight, expected in zip(history.model.trainable_weights,
                              _reference(accumulated, batches=4)):
    np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=1e-7)


def test_compiling_under_mixed_float16_wraps_the_optimizer_in_loss_scaling():
  build = optimizers.optimizer_fn(_config(optimizer="adam"), 1, 1)
  assert type(build()) is keras.optimizers.Adam
  with global_dtype_policy("mixed_float16"):
    history = run_loop("graph", epochs=1, model_fn=_model,
                       optimizer_fn=build, data=_batches(1))
  optimizer = history.model.optimizer
  assert type(optimizer) is keras.optimizers.LossScaleOptimizer
  assert type(optimizer.inner_optimizer) is keras.optimizers.Adam


def test_why_ema_is_refused_under_mixed_float16():
  """The moving averages start at zero and only an applied step sets them:
  when loss scaling skips every step, training ends on zeros."""
  build = optimizers.optimizer_fn(_config(ema_momentum=0.9), 2, 1)
  with global_dtype_policy("mixed_float16"):
    history = run_loop(
        "graph", epochs=1, model_fn=_model, data=_batches(2),
        optimizer_fn=lambda: keras.optimizers.LossScaleOptimizer(
            build(), initial_scale=2.0**40))
  assert int(history.model.optimizer.iterations) == 0  # all overflowed
  for weight in history.model.trainable_weights:
    np.testing.assert_array_equal(weight, 0.0)


def test_accumulation_under_a_mirrored_strategy_trains_eagerly_as_one_replica(
    mirrored):
  """Keras accumulates under a cond holding the replicas' merge_call, which
  no compiled loop (nor fit) can take: they refuse in one line. The eager
  loop sums the replicas' gradients before accumulating, as one replica."""
  build = optimizers.optimizer_fn(_config(gradient_accumulation_steps=2),
                                  4, 2)
  for loop in ("function", "graph", "keras_fit"):
    with pytest.raises(ValueError, match=r"^gradient_accumulation_steps "
                                         r"\(optimizer 'optimizer'\) under "
                                         r"MirroredStrategy trains in "
                                         r"loop='eager' only"):
      run_loop(loop, epochs=1, model_fn=_model, optimizer_fn=build,
               data=_batches(4), strategy=mirrored)
  one, two = (run_loop("eager", epochs=2, model_fn=_model,
                       optimizer_fn=build, data=_batches(4),
                       strategy=strategy) for strategy in (None, mirrored))
  assert int(two.model.optimizer.iterations) == 4  # 8 batches, 2 by 2
  assert_same_run(two, one, rtol=1e-6)


# -- check -------------------------------------------------------------------

VALID_PIECES = {"lr_schedule": "piecewise", **PIECES}
# (flags, flags the message names); a run of 2 epochs of 10 steps.
REFUSALS = {
    "momentum_with_sgd": ({"momentum": 0.9}, ("--momentum", "--optimizer")),
    "momentum_with_adam": ({"optimizer": "adam", "momentum": 0.5},
                           ("--momentum", "--optimizer")),
    "momentum_one": ({"optimizer": "momentum", "momentum": 1.0},
                     ("--momentum",)),
    "momentum_negative": ({"optimizer": "nesterov", "momentum": -0.1},
                          ("--momentum",)),
    "weight_decay_negative": ({"weight_decay": -0.01}, ("--weight_decay",)),
    "decay_rate_zero": ({"lr_schedule": "exponential", "decay_rate": 0.0},
                        ("--decay_rate",)),
    "decay_rate_above_one": ({"lr_schedule": "exponential",
                              "decay_rate": 1.5}, ("--decay_rate",)),
    "clipnorm_zero": ({"clipnorm": 0.0}, ("--clipnorm",)),
    "clipnorm_negative": ({"clipnorm": -1.0}, ("--clipnorm",)),
    "ema_momentum_one": ({"ema_momentum": 1.0}, ("--ema_momentum",)),
    "ema_momentum_negative": ({"ema_momentum": -0.5},
                              ("--ema_momentum",)),
    "warmup_the_whole_run": ({"warmup_steps": 20}, ("--warmup_steps",)),
    "warmup_longer_than_the_run": ({"lr_schedule": "cosine",
                                    "warmup_steps": 25},
                                   ("--warmup_steps",)),
    "accumulation_longer_than_the_run": (
        {"gradient_accumulation_steps": 21},
        ("--gradient_accumulation_steps",)),
    "pieces_without_piecewise": ({**PIECES},
                                 ("--lr_boundaries", "--lr_values",
                                  "--lr_schedule")),
    "values_without_piecewise": ({"lr_schedule": "cosine",
                                  "lr_values": [0.1]},
                                 ("--lr_values", "--lr_schedule")),
    "piecewise_without_pieces": ({"lr_schedule": "piecewise"},
                                 ("--lr_boundaries", "--lr_values")),
    "piecewise_without_values": ({"lr_schedule": "piecewise",
                                  "lr_boundaries": [3]},
                                 ("--lr_values",)),
    "boundary_not_an_integer": ({**VALID_PIECES,
                                 "lr_boundaries": [3, 6.5]},
                                ("--lr_boundaries",)),
    "boundaries_not_increasing": ({**VALID_PIECES,
                                   "lr_boundaries": [6, 6]},
                                  ("--lr_boundaries",)),
    "boundary_zero": ({**VALID_PIECES, "lr_boundaries": [0, 6]},
                      ("--lr_boundaries",)),
    "value_negative": ({**VALID_PIECES, "lr_values": [0.3, -0.2, 0.1]},
                       ("--lr_values",)),
    "value_nan": ({**VALID_PIECES, "lr_values": [0.3, float("nan"), 0.1]},
                  ("--lr_values",)),
    "value_infinite": ({**VALID_PIECES,
                        "lr_values": [float("inf"), 0.2, 0.1]},
                       ("--lr_values",)),
    "values_one_short": ({**VALID_PIECES, "lr_values": [0.3, 0.2]},
                         ("--lr_values", "--lr_boundaries")),
    "values_one_over": ({**VALID_PIECES,
                         "lr_values": [0.3, 0.2, 0.1, 0.05]},
                        ("--lr_values", "--lr_boundaries")),
    "decay_steps_with_constant": ({"decay_steps": 5},
                                  ("--decay_steps", "--lr_schedule")),
    "decay_steps_with_piecewise": ({**VALID_PIECES, "decay_steps": 5},
                                   ("--decay_steps", "--lr_schedule")),
    "decay_rate_with_constant": ({"decay_rate": 0.5},
                                 ("--decay_rate", "--lr_schedule")),
    "decay_rate_with_cosine": ({"lr_schedule": "cosine", "decay_rate": 0.5},
                               ("--decay_rate", "--lr_schedule")),
    "accumulation_under_mirrored": ({"gradient_accumulation_steps": 2,
                                     "strategy": "mirrored"},
                                    ("--gradient_accumulation_steps",
                                     "--strategy", "--loop=eager")),
    "ema_under_mixed_float16": ({"precision": "mixed_float16",
                                 "ema_momentum": 0.99},
                                ("--ema_momentum", "--precision")),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_check_refuses_bad_flags_with_one_line_naming_them(case):
  flags, named = REFUSALS[case]
  with pytest.raises(run_config.SettingsError) as error:
    optimizers.check(_config(**flags), 10, 2)
  message = str(error.value)
  assert "\n" not in message
  for flag in named:
    assert flag in message, (flag, message)


# Each refusal's nearest accepted neighbour.
ACCEPTED = {
    "momentum_zero": {"optimizer": "momentum", "momentum": 0.0},
    "nesterov_default": {"optimizer": "nesterov"},
    "no_weight_decay": {"optimizer": "adamw", "weight_decay": 0.0},
    "decay_rate_one": {"lr_schedule": "exponential", "decay_rate": 1.0,
                       "decay_steps": 3},
    "clipnorm": {"clipnorm": 1e-6},
    "ema_momentum": {"ema_momentum": 0.999},
    "warmup_to_the_last_step": {"lr_schedule": "cosine",
                                "warmup_steps": 19},
    "accumulation_over_the_run": {"gradient_accumulation_steps": 20},
    "piecewise": {**VALID_PIECES, "warmup_steps": 2},
    "cosine_decay_steps": {"lr_schedule": "cosine", "decay_steps": 50},
    "accumulation_in_eager_under_mirrored": {
        "gradient_accumulation_steps": 2, "strategy": "mirrored",
        "loop": "eager"},
    "mixed_float16": {"precision": "mixed_float16", "optimizer": "adamw",
                      "weight_decay": DECAY, "clipnorm": 1.0,
                      "gradient_accumulation_steps": 2,
                      "lr_schedule": "cosine", "warmup_steps": 3},
    "ema_under_mixed_bfloat16": {"precision": "mixed_bfloat16",
                                 "ema_momentum": 0.99},
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_check_accepts_the_edges_of_each_range(case):
  config = _config(**ACCEPTED[case])
  optimizers.check(config, 10, 2)
  assert isinstance(optimizers.optimizer_fn(config, 10, 2)(),
                    keras.optimizers.Optimizer)
