"""The optimizer and learning-rate schedule the optimizer flags name.

`check` refuses a bad combination of flags before anything is written;
`optimizer_fn` then gives the `optimizer_fn` of `training_loops.train`.

| flag | Keras |
| --- | --- |
| `--optimizer=sgd` | `SGD` |
| `--optimizer=momentum` | `SGD(momentum=m)` |
| `--optimizer=nesterov` | `SGD(momentum=m, nesterov=True)` |
| `--optimizer=adam`, `adamw` | `Adam`, `AdamW` |
| `--optimizer=rmsprop`, `adagrad` | `RMSprop`, `Adagrad` |
| `--momentum` | `m` above; default 0.9 |
| `--learning_rate` | `learning_rate`: the float, or the schedule's peak |
| `--lr_schedule=constant` | the float |
| `--lr_schedule=exponential` | `ExponentialDecay(lr, decay_steps, rate)` |
| `--lr_schedule=piecewise` | `PiecewiseConstantDecay(boundaries, values)` |
| `--lr_schedule=cosine` | `CosineDecay(lr, decay_steps)`, to 0 |
| `--warmup_steps` (cosine) | `CosineDecay(0.0, ..., warmup_target=lr, w)` |
| `--warmup_steps` (others) | `Warmup(w, the schedule or lr)` |
| `--decay_steps`, `--decay_rate` | `decay_steps`, `rate` above; 0.9 |
| `--lr_boundaries`, `--lr_values` | `boundaries`, `values` above |
| `--weight_decay` | `weight_decay` (None when 0, except `AdamW`'s) |
| `--clipnorm` | `global_clipnorm` (the norm of all gradients together) |
| `--ema_momentum` | `use_ema=ema_momentum > 0`, `ema_momentum` |
| `--gradient_accumulation_steps` | `gradient_accumulation_steps` (None at 1) |
| `--precision=mixed_float16` | none: compiling wraps a `LossScaleOptimizer` |

Steps are batches. Keras calls a schedule with the optimizer's count of
`apply_gradients` calls (`_iterations`), one per batch also under gradient
accumulation, where the public `iterations` counts updates (`_iterations //
gradient_accumulation_steps`). So `--warmup_steps`, `--decay_steps` and
`--lr_boundaries` count batches, and a run has epochs x steps_per_epoch of
them whatever the accumulation. (A step a `LossScaleOptimizer` skips for
overflowing is not counted.)
"""

import math

import keras
from keras import ops

from research.framework import run_config

_MOMENTUM_DEFAULT = 0.9
# Adam's decay rates, flags of the experiments that set them.
ADAM_BETAS = ("beta_1", "beta_2")
_DECAY_RATE_DEFAULT = 0.9
_CLASSES = {"sgd": keras.optimizers.SGD, "momentum": keras.optimizers.SGD,
            "nesterov": keras.optimizers.SGD, "adam": keras.optimizers.Adam,
            "adamw": keras.optimizers.AdamW,
            "rmsprop": keras.optimizers.RMSprop,
            "adagrad": keras.optimizers.Adagrad}


@keras.saving.register_keras_serializable(package="research")
class Warmup(keras.optimizers.schedules.LearningRateSchedule):
  """A linear warm-up from 0 at step 0 to `after`'s rate at its step 0,
  reached at `warmup_steps`; from there `after`, counted from the end of
  the warm-up (`step - warmup_steps`).

  Args:
    warmup_steps: the steps of the warm-up, >= 1.
    after: the rate after the warm-up: a float, or a
      `keras.optimizers.schedules.LearningRateSchedule`.
  """

  def __init__(self, warmup_steps, after):
    super().__init__()
    self.warmup_steps = warmup_steps
    self.after = after

  def __call__(self, step):
    step = ops.convert_to_tensor(step)
    later = self._after(ops.maximum(step - self.warmup_steps, 0))
    peak = self._after(ops.zeros_like(step))
    ramp = peak * ops.cast(step, peak.dtype) / self.warmup_steps
    return ops.where(step < self.warmup_steps, ramp, later)

  def _after(self, step):
    if isinstance(self.after, keras.optimizers.schedules.LearningRateSchedule):
      return ops.convert_to_tensor(self.after(step))
    return ops.convert_to_tensor(self.after, "float32")

  def get_config(self):
    after = self.after
    if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
      after = keras.optimizers.schedules.serialize(after)
    return {"warmup_steps": self.warmup_steps, "after": after}

  @classmethod
  def from_config(cls, config):
    after = config["after"]
    if isinstance(after, dict):
      after = keras.optimizers.schedules.deserialize(after)
    return cls(config["warmup_steps"], after)


def check(config, steps_per_epoch, epochs):
  """Refuses a combination of the optimizer flags that Keras would reject,
  ignore or train wrongly with.

  Args:
    config: the run's `run_config.RunConfig`.
    steps_per_epoch: the batches an epoch trains on.
    epochs: the epochs of the run.

  Raises:
    run_config.SettingsError: one line naming the flags and what is
      accepted.
  """
  optimizer = config.optimizer
  if config.momentum is not None and optimizer not in ("momentum",
                                                          "nesterov"):
    raise run_config.SettingsError(
        f"--momentum is for --optimizer=momentum or nesterov, not "
        f"{optimizer}; accepted: one of those, or no --momentum.")
  for beta in ADAM_BETAS:
    if getattr(config, beta) is not None and optimizer not in ("adam",
                                                               "adamw"):
      raise run_config.SettingsError(
          f"--{beta} is for --optimizer=adam or adamw, not {optimizer}; "
          "accepted: one of those.")
  _check_schedule(config, steps_per_epoch * epochs)
  accumulation = config.gradient_accumulation_steps
  if (accumulation > 1 and config.strategy in ("mirrored", "multi_worker")
      and config.loop != "eager"):
    # What `training_loops.train` refuses too, said before anything runs.
    raise run_config.SettingsError(
        f"--gradient_accumulation_steps={accumulation} with "
        f"--strategy={config.strategy} trains in --loop=eager only: Keras "
        "applies the accumulated gradient in a cond whose branch needs the "
        "replicas' merge_call, which fails in model.fit and the function "
        "and graph loops; accepted: --loop=eager, "
        "--gradient_accumulation_steps=1, or --strategy=default or "
        "one_device.")
  if config.precision == "mixed_float16" and config.ema_momentum > 0:
    raise run_config.SettingsError(
        f"--ema_momentum={config.ema_momentum} with "
        "--precision=mixed_float16: Keras' moving averages start at zero and "
        "only an applied step sets them, and the LossScaleOptimizer skips "
        "every overflowing step (typically the first few), so a run whose "
        "steps all overflow ends on all-zero weights; accepted: "
        "--ema_momentum=0, or --precision=float32 or mixed_bfloat16.")


def learning_rate(config, steps_per_epoch, epochs):
  """The learning rate the flags describe, for a run of `epochs` x
  `steps_per_epoch` batches.

  Returns:
    A float for a constant rate without warm-up, else a
    `keras.optimizers.schedules.LearningRateSchedule`.

  """
  peak = float(config.learning_rate)
  warmup, schedule = config.warmup_steps, config.lr_schedule
  decay_steps = config.decay_steps
  if schedule == "cosine":
    # Keras' warm-up is linear from initial_learning_rate: from 0 here.
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else peak,
        decay_steps or steps_per_epoch * epochs - warmup,
        warmup_target=peak if warmup else None, warmup_steps=warmup)
  if schedule == "exponential":
    rate = config.decay_rate
    after = keras.optimizers.schedules.ExponentialDecay(
        peak, decay_steps or steps_per_epoch,
        _DECAY_RATE_DEFAULT if rate is None else float(rate))
  elif schedule == "piecewise":
    after = keras.optimizers.schedules.PiecewiseConstantDecay(
        *_piecewise(config))
  else:
    after = peak
  return Warmup(warmup, after) if warmup else after


def optimizer_fn(config, steps_per_epoch, epochs):
  """Returns a zero-argument callable that builds a new Keras optimizer
  each call, as `training_loops.train` wants it (inside the strategy's
  scope).

  Not wrapped in a `LossScaleOptimizer`: under a `mixed_float16` policy,
  compiling the model wraps it, as for `model.fit`.
  """
  name = config.optimizer
  weight_decay = config.weight_decay
  ema_momentum = config.ema_momentum
  accumulation = config.gradient_accumulation_steps
  kwargs = {
      # AdamW is Adam with its own default decay: 0 must reach it as 0.
      "weight_decay": (weight_decay if weight_decay or name == "adamw"
                       else None),
      "global_clipnorm": config.clipnorm,
      "use_ema": ema_momentum > 0, "ema_momentum": ema_momentum,
      "gradient_accumulation_steps": accumulation if accumulation > 1
                                     else None}
  if name in ("adam", "adamw"):
    kwargs.update({key: getattr(config, key) for key in ADAM_BETAS
                   if getattr(config, key) is not None})
  if name in ("momentum", "nesterov"):
    momentum = config.momentum
    kwargs["momentum"] = float(_MOMENTUM_DEFAULT if momentum is None
                               else momentum)
    kwargs["nesterov"] = name == "nesterov"

  def build():
    return _CLASSES[name](
        learning_rate=learning_rate(config, steps_per_epoch, epochs),
        **kwargs)
  return build


def _check_schedule(config, run_steps):
  """The schedule flags against each other and the run's `run_steps`
  batches."""
  schedule = config.lr_schedule
  warmup = config.warmup_steps
  accumulation = config.gradient_accumulation_steps
  if warmup >= run_steps:
    raise run_config.SettingsError(
        f"--warmup_steps={warmup} does not end before the run's {run_steps} "
        f"steps (--epochs x batches per epoch); accepted: 0 to "
        f"{run_steps - 1}.")
  if accumulation > run_steps:
    raise run_config.SettingsError(
        f"--gradient_accumulation_steps={accumulation} is more than the "
        f"run's {run_steps} steps, so the optimizer would never apply; "
        f"accepted: 1 to {run_steps}.")
  given = [name for name in ("lr_boundaries", "lr_values")
           if getattr(config, name) is not None]
  if schedule == "piecewise":
    _piecewise(config)
  elif given:
    raise run_config.SettingsError(
        f"--{' and --'.join(given)} are for --lr_schedule=piecewise, not "
        f"{schedule}; accepted: --lr_schedule=piecewise, or neither flag.")
  if config.decay_steps is not None and schedule not in ("exponential",
                                                           "cosine"):
    raise run_config.SettingsError(
        f"--decay_steps is for --lr_schedule=exponential or cosine, not "
        f"{schedule}; accepted: one of those, or no --decay_steps.")
  if config.decay_rate is not None and schedule != "exponential":
    raise run_config.SettingsError(
        f"--decay_rate is for --lr_schedule=exponential, not {schedule}; "
        "accepted: --lr_schedule=exponential, or no --decay_rate.")


def _piecewise(config):
  """`(boundaries, values)` of `--lr_boundaries` and `--lr_values`, checked
  as `PiecewiseConstantDecay` needs them."""
  boundaries, values = config.lr_boundaries, config.lr_values
  if not boundaries or not values:
    raise run_config.SettingsError(
        "--lr_schedule=piecewise needs --lr_boundaries and --lr_values; "
        "accepted: e.g. --lr_boundaries=1000,2000 --lr_values=0.1,0.01,0.001.")
  if boundaries[0] <= 0 or any(later <= earlier for earlier, later
                               in zip(boundaries, boundaries[1:])):
    raise run_config.SettingsError(
        f"--lr_boundaries={_listed(boundaries)} is not strictly "
        "increasing from above 0; accepted: increasing positive integers.")
  if not all(0 < value < math.inf for value in values):
    raise run_config.SettingsError(
        f"--lr_values={_listed(values)} holds a rate that is not a "
        "positive number; accepted: finite rates > 0.")
  if len(values) != len(boundaries) + 1:
    raise run_config.SettingsError(
        f"--lr_values has {len(values)} rates for {len(boundaries)} "
        f"--lr_boundaries; accepted: {len(boundaries) + 1}, one per "
        "interval.")
  return list(boundaries), list(values)


def _listed(numbers):
  return ",".join(map(str, numbers))
