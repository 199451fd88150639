"""`train`: one training run, four interchangeable ways; `evaluate`;
`build_driver`, the assembly both use."""

import contextlib
import dataclasses

import keras
import tensorflow as tf

# keras_fit registers the "keras_fit" loop, after the custom loops.
from training_loops import drivers, keras_fit  # noqa: F401
from training_loops import run_lock, strategies
from training_loops.controller import (Controller, RunOptions, as_floats,
                                       known_length)
from training_loops.keras_step import KerasStep, overrides_step
from training_loops.step import TrainingStep
from training_loops.supervised_step import Trainer, first_line, shapes

# The loops that ship, in the registry's order; `drivers.register` adds more.
LOOPS = tuple(drivers.DRIVERS)


def train(model_fn, optimizer_fn=None, loss=None, train_data=None, *,
          loop="graph", epochs=1, validation_data=None, metrics=(),
          loss_weights=None, strategy=None, steps_per_loop=None,
          jit_compile=False, checkpoint_dir=None, log_dir=None, callbacks=(),
          seed=None, verbose=1, eval_every_steps=None,
          checkpoint_every_steps=None):
  """Trains the model (or step) `model_fn()` builds on `train_data`.

  Three kinds of training step, told apart by what `model_fn` returns:
  - a plain `keras.Model`: the supervised step, `(x, y[, sample_weight])`
    batches, the loss `loss` and the optimizer `optimizer_fn()`; the model
    is compiled with them (so `model.fit` and Keras' callbacks find them);
  - a compiled `keras.Model` whose class overrides `train_step` (and
    optionally `test_step`) or `compute_loss`: its own step, on batches of
    any structure, as `model.fit` runs it; give no `optimizer_fn`, `loss`,
    `metrics` or `loss_weights` (compile them into the model);
  - a `step.TrainingStep`: the protocol itself, the same way.

  The arguments fall into three option objects, each checked where it is
  made: `SupervisedOptions` (the supervised step's), `drivers.LoopOptions`
  (how the loop runs steps) and `controller.RunOptions` (what happens
  around them). Builds the step and the loop's driver under the strategy
  (`build_driver`) and hands the run to a `Controller`.

  Args:
    model_fn: builds the model or step; called inside `strategy.scope()`.
    optimizer_fn: builds the supervised step's optimizer, likewise.
    loss: a `keras.losses.Loss` (e.g. from `losses`), or a dict/list of them
      for a multi-output model, combined with `loss_weights`: as fit, a
      dict is keyed by output name, a list by output position.
    train_data, validation_data: batched `tf.data.Dataset`s: `(x, y)` or
      `(x, y, sample_weight)` batches for the supervised step, where `x`
      and `y` may be nested, and for a multi-output model `sample_weight`
      may be a dict or list with one per output, as fit takes them; any
      structure a model's own step takes. Pass a freshly built dataset to
      each run: a reshuffling dataset continues its sequence of orders
      across runs, so two runs would see different data.
    loop: one of `LOOPS`, or a loop added with `drivers.register`.
    epochs: the total number of epochs, counting those a resumed run did.
    metrics: `keras.metrics.Metric` objects (for a multi-output model a
      dict output name -> list, or a list of lists, one per output);
      copied for this run.
    strategy: a `tf.distribute.Strategy`; default: the current one.
    steps_per_loop, jit_compile: `drivers.LoopOptions`.
    checkpoint_dir: save every epoch there (and every
      `checkpoint_every_steps`, and where a stop request stopped); if it
      holds a checkpoint, resume from it. The run holds a `RunLock` on it
      (in a multi-worker run, the chief does).
    log_dir: TensorBoard event files in `log_dir/train` and
      `log_dir/validation`.
    callbacks: `keras.callbacks.Callback`s (ours or Keras').
    seed: seeds Python, NumPy and TensorFlow before the model is built.
    verbose: 0 silent, 1 a progress bar, 2 one line per epoch.
    eval_every_steps: also validate every this many training steps,
      counted over the run (`History.step_history`, and TensorBoard's
      `evaluation_<metric>_vs_iterations`); an epoch's end validates as
      before. Needs `validation_data`. Calls of `steps_per_loop` steps end
      at these steps; `keras_fit` validates at the end of the execution
      that reaches one.
    checkpoint_every_steps: also checkpoint every this many training steps
      (with the data position and running metrics), so a crash loses at
      most that many. Needs `checkpoint_dir` and a loop that resumes inside
      an epoch: not `keras_fit`.

  Returns:
    A `History`.

  Raises:
    RunLockedError: another live run holds `checkpoint_dir`.
    WriteError: a checkpoint could not be written; the one before stands.
    See also `Controller.run`.
  """
  drivers.check_loop(loop)
  check_data("train_data", train_data)
  if validation_data is not None:
    check_data("validation_data", validation_data)
  run = RunOptions(epochs, validation_data, checkpoint_dir, log_dir,
                   tuple(callbacks), verbose, eval_every_steps,
                   checkpoint_every_steps)
  options = drivers.LoopOptions(steps_per_loop, jit_compile)
  _check_loop_takes(loop, options, run, train_data)
  driver = build_driver(
      loop, model_fn, train_data, validation_data,
      supervised=SupervisedOptions(optimizer_fn, loss, metrics, loss_weights),
      options=options, strategy=strategy, seed=seed)
  with (run_lock.held_by_chief(checkpoint_dir, driver.trainer.strategy)
        if checkpoint_dir else contextlib.nullcontext()):
    return Controller(driver, train_data, run).run()


@dataclasses.dataclass(frozen=True)
class SupervisedOptions:
  """What the supervised step is built from, as `train` takes it. A
  model's own step takes none of them."""
  optimizer_fn: object = None
  loss: object = None
  metrics: object = ()
  loss_weights: object = None

  def given(self):
    """The names of the options given."""
    return [field.name for field in dataclasses.fields(self)
            if _given(getattr(self, field.name))]


def _given(value):
  # An empty list or dict of metrics is none given.
  return value is not None and not (
      isinstance(value, (list, tuple, dict)) and not value)


def build_driver(loop, model_fn, train_data, validation_data=None, *,
                 supervised=SupervisedOptions(),
                 options=drivers.LoopOptions(), strategy=None, seed=None):
  """The driver of `loop` around the training step `model_fn()` builds
  (see `train`), built under `strategy` (default: the current one) after
  seeding with `seed` (unless None), so builds with one seed start from the
  same weights. The data is only checked against the step and traced, not
  read."""
  drivers.check_loop(loop)
  driver = drivers.DRIVERS[loop]
  driver.check_options(options)
  strategy = strategy or tf.distribute.get_strategy()
  if options.jit_compile:
    strategies.check_jit_compile(strategy)
  if seed is not None:
    keras.utils.set_random_seed(seed)
  with strategy.scope():
    built = model_fn()
    if isinstance(built, TrainingStep) or overrides_step(built):
      step = _own_step(built, supervised, strategy)
      step.build(train_data.element_spec, validation_data and
                 validation_data.element_spec)
    else:
      step = _supervised_step(built, supervised, options, train_data,
                              validation_data, strategy)
  strategies.check_gradient_accumulation(step.optimizers(), strategy,
                                         driver.runs_eagerly)
  return driver(step, options)


def _own_step(built, supervised, strategy):
  """A model's own step, or a `TrainingStep` given whole: refuses the
  supervised step's options in one line."""
  given = supervised.given()
  if given:
    what = (type(built).__name__ if isinstance(built, TrainingStep)
            else f"{type(built).__name__}, whose class defines its own step,")
    raise ValueError(
        f"{what} takes no {', '.join(given)}: give the optimizers, losses "
        "and metrics to the model's compile() (loss weights, metrics and "
        "clipnorm are compile's and the optimizer's arguments), or build "
        "them into the step.")
  return built if isinstance(built, TrainingStep) else KerasStep(
      built, strategy)


def _supervised_step(model, supervised, options, train_data,
                     validation_data, strategy):
  missing = [name for name in ("optimizer_fn", "loss")
             if getattr(supervised, name) is None]
  if missing:
    raise ValueError(
        f"train needs {' and '.join(missing)} for a model without a "
        f"training step of its own (a class overriding train_step or "
        f"compute_loss); got a {type(model).__name__}.")
  for name, data in (("train_data", train_data),
                     ("validation_data", validation_data)):
    if data is not None:
      _check_supervised_data(name, data)
  trainer, example = _built_trainer(
      model, supervised.optimizer_fn(), supervised.loss,
      supervised.loss_weights, supervised.metrics, strategy, train_data)
  _compile(trainer, options, example)
  for name, data in (("train_data", train_data),
                     ("validation_data", validation_data)):
    _check_per_output_data(name, data, trainer.output_losses)
  return trainer


def _compile(trainer, options, example):
  """Compiles the model for every loop, as `model.fit` needs it and as
  Keras' callbacks expect it (`model.optimizer`, `model.loss`, the metrics),
  then builds the optimizer the model got: compiling may wrap it (in a
  `LossScaleOptimizer` under a `mixed_float16` policy, fit's
  `auto_scale_loss`), and every loop must step with the same one.

  The metrics are the trainer's copies (`Trainer.build_metrics`); Keras'
  container of them is built on `example` (zero targets and predictions),
  as fit builds it at its first step: Keras' monitoring callbacks
  (`EarlyStopping(monitor="val_accuracy")` in mode "auto") read it at the
  first epoch's end. XLA is the drivers' business
  (`LoopOptions.jit_compile`), so the model is compiled without it; the
  `keras_fit` driver sets it.
  """
  if trainer.output_losses[0].output is None:
    metrics = list(trainer.train_metrics.values())
  else:
    metrics = {}
    for (output, _), metric in trainer.train_metrics.items():
      metrics.setdefault(str(output), []).append(metric)
  model = trainer.model
  model.compile(optimizer=trainer.optimizer, loss=trainer.loss,
                loss_weights=trainer.loss_weights, metrics=metrics or None,
                steps_per_execution=options.steps_per_loop or 1,
                jit_compile=False)
  if model._compile_metrics is not None:
    model._compile_metrics.build(*example)
  trainer.optimizer = model.optimizer
  trainer.optimizer.build(model.trainable_variables)


def evaluate(model, loss, data, *, metrics=(), loss_weights=None,
             strategy=None):
  """Returns `{"loss": ..., <metric>: ...}` of `model` on `data`, computed
  with `training=False` exactly as the loops' validation is."""
  strategy = strategy or tf.distribute.get_strategy()
  check_data("data", data)
  _check_supervised_data("data", data)
  with strategy.scope():
    trainer, _ = _built_trainer(model, None, loss, loss_weights, metrics,
                                strategy, data)
  _check_per_output_data("data", data, trainer.output_losses)
  driver = drivers.GraphDriver(trainer)
  last_logs = driver.evaluate(
      iter(strategy.experimental_distribute_dataset(data)))
  return as_floats(trainer.eval_logs(last_logs, prefix=""))


def _check_model_fits_data(model, loss, data):
  """Runs the model (inference mode: no state changes) and, for a single
  output, the loss on one zero example shaped like `data`'s elements.

  Builds an unbuilt model, so every variable exists before a checkpoint is
  restored into it or a replica step runs; raises a `ValueError` naming the
  data's and the model's shapes when they do not fit. Returns the zero
  example's `(targets, predictions)`.
  """
  x_spec, y_spec = data.element_spec[:2]
  x = _zero_example(x_spec)
  try:
    predictions = model(x, training=False)
  except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
    raise ValueError(
        f"The model does not accept the data's inputs "
        f"{shapes(x_spec)}: {first_line(error)}") from None
  targets = _zero_example(y_spec)
  if not isinstance(loss, keras.losses.Loss) or _several(predictions):
    return targets, predictions  # multi-output: checked when each runs
  try:
    loss(targets, predictions)
  except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
    raise ValueError(
        f"The model's outputs {shapes(predictions)} do not fit the data's "
        f"targets {shapes(y_spec)} under {type(loss).__name__}: "
        f"{first_line(error)}") from None
  return targets, predictions


def _built_trainer(model, optimizer, loss, loss_weights, metrics, strategy,
                   data):
  """The supervised step of `model` on `data` (checked to fit it), its
  metrics built; and the zero example `(targets, predictions)` it was
  checked on."""
  example = _check_model_fits_data(model, loss, data)
  trainer = Trainer(model, optimizer, _per_output(loss, example[1]),
                    loss_weights, metrics, strategy)
  trainer.build_metrics(*example)
  return trainer, example


def _several(predictions):
  return len(tf.nest.flatten(predictions)) > 1


def _per_output(loss, predictions):
  """One `Loss` for a model of several outputs becomes one per output, as
  fit applies it: their sum is the loss, each logged as `<output>_loss`.
  `predictions`: the model's on one example."""
  if not isinstance(loss, keras.losses.Loss) or not _several(predictions):
    return loss
  if isinstance(predictions, dict):
    return {key: loss for key in predictions}
  return [loss] * len(predictions)


def _check_per_output_data(name, data, output_losses):
  """With a loss per output, the targets, and sample weights given per
  output, must hold an entry for each output with a loss: under its name (a
  dict) or at its position (a tuple), as fit picks them."""
  if data is None:
    return
  outputs = [loss.output for loss in output_losses]
  targets = data.element_spec[1]
  if tf.nest.is_nested(targets):
    if outputs != [None]:
      _check_entries(f"{name}'s targets", targets, outputs)
  elif len(outputs) > 1:
    raise ValueError(
        f"{name}'s targets are one tensor of shape {tuple(targets.shape)}, "
        f"but the losses are per output ({_listed(outputs)}): give a dict "
        f"or a tuple of targets (tf.data stacks a Python list into one "
        f"tensor).")
  weights = data.element_spec[2] if len(data.element_spec) == 3 else None
  if not tf.nest.is_nested(weights):
    return  # none, or one weight per example for every output
  if outputs == [None]:
    raise ValueError(f"{name}'s sample weights are per output "
                     f"({_entries(weights)}), but the loss is one: give one "
                     f"array of weights.")
  _check_entries(f"{name}'s sample weights", weights, outputs)


def _check_entries(what, structure, outputs):
  missing = [output for output in outputs
             if not output.picks_from(structure)]
  if missing:
    raise ValueError(
        f"{what} are per output ({_entries(structure)}) but miss "
        f"{_listed(missing)}: give one entry per output with a loss "
        f"({_listed(outputs)}), under its name in a dict or at its position "
        f"in a tuple.")


def _listed(outputs):
  return [str(output) for output in outputs]


def _entries(structure):
  if isinstance(structure, dict):
    return list(structure)
  return list(range(len(structure)))


def _zero_example(spec):
  return tf.nest.map_structure(
      lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype),
      spec)


def _check_loop_takes(loop, options, run, train_data):
  """Refuses a step cadence `loop` cannot keep with `options`."""
  cadence = bool(run.eval_every_steps or run.checkpoint_every_steps)
  if (cadence and loop == "keras_fit" and (options.steps_per_loop or 1) > 1
      and known_length(train_data) is None):
    raise ValueError(
        "eval_every_steps with keras_fit and steps_per_loop > 1 needs "
        "train_data of known length (fit does not say how many batches "
        "its last execution ran); give the dataset a cardinality, or use "
        "steps_per_loop=1.")
  if (run.checkpoint_every_steps
      and not drivers.DRIVERS[loop].resumes_mid_epoch):
    resuming = [name for name, driver in drivers.DRIVERS.items()
                if driver.resumes_mid_epoch]
    raise ValueError(
        f"checkpoint_every_steps needs a loop that resumes inside an "
        f"epoch ({', '.join(resuming)}); {loop} starts only at an "
        "epoch's beginning.")


def check_data(name, data):
  """Refuses in one line what is not a non-empty `tf.data.Dataset`."""
  if not isinstance(data, tf.data.Dataset):
    raise ValueError(f"{name} must be a batched tf.data.Dataset, got "
                     f"{type(data).__name__}.")
  if int(data.cardinality()) == 0:
    raise ValueError(f"{name} is empty: it yields no batches.")


def _check_supervised_data(name, data):
  if not isinstance(data.element_spec, tuple) or not (
      2 <= len(data.element_spec) <= 3):
    raise ValueError(f"{name} must yield (x, y) or (x, y, sample_weight) "
                     f"batches for the supervised step, got elements "
                     f"{data.element_spec} (a model whose class defines "
                     f"its own train_step takes any).")
