"""`train`: one training run, four interchangeable ways; `evaluate`."""

import contextlib

import keras
import tensorflow as tf

# keras_fit registers the "keras_fit" loop, after the custom loops.
from training_loops import drivers, keras_fit  # noqa: F401
from training_loops import run_lock, strategies
from training_loops.controller import (Cadence, Controller, as_floats,
                                       known_length)
from training_loops.trainer import Trainer, first_line

# The loops that ship, in the registry's order; `drivers.register` adds more.
LOOPS = tuple(drivers.DRIVERS)


def train(model_fn, optimizer_fn, loss, train_data, *, loop="graph",
          epochs=1, validation_data=None, metrics=(), loss_weights=None,
          strategy=None, steps_per_loop=None, jit_compile=False,
          checkpoint_dir=None, log_dir=None, callbacks=(), seed=None,
          verbose=1, eval_every_steps=None, checkpoint_every_steps=None):
  """Trains `model_fn()` with `optimizer_fn()` on `train_data`.

  Checks the arguments, builds the model, optimizer and `Trainer` under
  the strategy, and hands the run to a `Controller` with the loop's driver.

  Args:
    model_fn, optimizer_fn: build the model and optimizer; called inside
      `strategy.scope()`.
    loss: a `keras.losses.Loss` (e.g. from `losses`), or a dict/list of them
      for a multi-output model, combined with `loss_weights`.
    train_data, validation_data: `tf.data.Dataset`s of `(x, y)` or
      `(x, y, sample_weight)` batches; `x` and `y` may be nested, and for
      a multi-output model `sample_weight` may be a dict or list with one
      per output, as fit takes them. Pass a freshly built dataset to each
      run: a reshuffling dataset continues its sequence of orders across
      runs, so two runs would see different data.
    loop: one of `LOOPS`, or a loop added with `drivers.register`.
    epochs: the total number of epochs, counting those a resumed run did.
    metrics: `keras.metrics.Metric` objects (a dict output -> list for a
      multi-output model); copied for this run.
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
  _check_arguments(loop, epochs, train_data, validation_data)
  cadence = Cadence(eval_every_steps, checkpoint_every_steps)
  _check_cadence(cadence, loop, steps_per_loop, train_data, validation_data,
                 checkpoint_dir)
  driver = _build(loop, drivers.LoopOptions(steps_per_loop, jit_compile),
                  model_fn, optimizer_fn, loss, train_data, metrics=metrics,
                  loss_weights=loss_weights, strategy=strategy, seed=seed)
  for name, data in (("train_data", train_data),
                     ("validation_data", validation_data)):
    _check_per_output_data(name, data, driver.trainer.output_losses)
  with (run_lock.held_by_chief(checkpoint_dir, driver.trainer.strategy)
        if checkpoint_dir else contextlib.nullcontext()):
    return Controller(
        driver, train_data, epochs=epochs, validation_data=validation_data,
        checkpoint_dir=checkpoint_dir, log_dir=log_dir, callbacks=callbacks,
        verbose=verbose, cadence=cadence).run()


def _build(loop, options, model_fn, optimizer_fn, loss, data, *, metrics,
           loss_weights, strategy, seed):
  """The driver of `loop` around a new `Trainer`: model and optimizer built
  under `strategy` (default: the current one) after seeding with `seed`
  (unless None), so builds with one seed start from the same weights;
  `data` is only checked against the model."""
  strategy = strategy or tf.distribute.get_strategy()
  if options.jit_compile:
    strategies.check_jit_compile(strategy)
  if seed is not None:
    keras.utils.set_random_seed(seed)
  with strategy.scope():
    model, optimizer = model_fn(), optimizer_fn()
    example = _check_model_fits_data(model, loss, data)
    trainer = Trainer(model, optimizer, loss, loss_weights, metrics,
                      strategy)
    trainer.build_metrics(*example)
    _compile(trainer, options, example)
  return drivers.DRIVERS[loop](trainer, options)


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
  if trainer.output_losses[0].key is None:
    metrics = list(trainer.train_metrics.values())
  else:
    metrics = {}
    for (key, _), metric in trainer.train_metrics.items():
      metrics.setdefault(key, []).append(metric)
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
  with strategy.scope():
    trainer = Trainer(model, None, loss, loss_weights, metrics, strategy)
    trainer.build_metrics(*_check_model_fits_data(model, loss, data))
  _check_per_output_data("data", data, trainer.output_losses)
  driver = drivers.GraphDriver(trainer)
  driver.evaluate(iter(strategy.experimental_distribute_dataset(data)))
  return as_floats(trainer.eval_logs(prefix=""))


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
        f"{_shapes(x_spec)}: {first_line(error)}") from None
  targets = _zero_example(y_spec)
  if not isinstance(loss, keras.losses.Loss):
    return targets, predictions  # multi-output: checked when each runs
  try:
    loss(targets, predictions)
  except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
    raise ValueError(
        f"The model's outputs {_shapes(predictions)} do not fit the data's "
        f"targets {_shapes(y_spec)} under {type(loss).__name__}: "
        f"{first_line(error)}") from None
  return targets, predictions


def _check_per_output_data(name, data, output_losses):
  """With a loss per output, the targets, and sample weights given per
  output, must hold an entry for each output with a loss: under its key (a
  dict) or at its index (a tuple), as fit picks them."""
  if data is None:
    return
  keys = [output.key for output in output_losses]
  targets = data.element_spec[1]
  if tf.nest.is_nested(targets):
    if keys != [None]:
      _check_entries(f"{name}'s targets", targets, keys)
  elif len(keys) > 1:
    raise ValueError(
        f"{name}'s targets are one tensor of shape {tuple(targets.shape)}, "
        f"but the losses are per output ({keys}): give a dict or a tuple of "
        f"targets (tf.data stacks a Python list into one tensor).")
  weights = data.element_spec[2] if len(data.element_spec) == 3 else None
  if not tf.nest.is_nested(weights):
    return  # none, or one weight per example for every output
  if keys == [None]:
    raise ValueError(f"{name}'s sample weights are per output "
                     f"({_entries(weights)}), but the loss is one: give one "
                     f"array of weights.")
  _check_entries(f"{name}'s sample weights", weights, keys)


def _check_entries(what, structure, keys):
  given = _entries(structure)
  missing = [key for key in keys if key not in given]
  if missing:
    raise ValueError(
        f"{what} are per output ({given}) but miss {missing}: give one "
        f"entry per output with a loss ({keys}).")


def _entries(structure):
  if isinstance(structure, dict):
    return list(structure)
  return list(range(len(structure)))


def _zero_example(spec):
  return tf.nest.map_structure(
      lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype),
      spec)


def _shapes(structure):
  shapes = tf.nest.map_structure(lambda t: tuple(t.shape), structure)
  return shapes


def _check_arguments(loop, epochs, train_data, validation_data):
  _check_loop(loop)
  if not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f"epochs must be a positive int, got {epochs!r}.")
  _check_data("train_data", train_data)
  if validation_data is not None:
    _check_data("validation_data", validation_data)


def _check_cadence(cadence, loop, steps_per_loop, train_data,
                   validation_data, checkpoint_dir):
  if cadence.eval_every_steps and validation_data is None:
    raise ValueError("eval_every_steps needs validation_data.")
  if (cadence.active and loop == "keras_fit" and (steps_per_loop or 1) > 1
      and known_length(train_data) is None):
    raise ValueError(
        "eval_every_steps with keras_fit and steps_per_loop > 1 needs "
        "train_data of known length (fit does not say how many batches "
        "its last execution ran); give the dataset a cardinality, or use "
        "steps_per_loop=1.")
  if cadence.checkpoint_every_steps:
    if checkpoint_dir is None:
      raise ValueError("checkpoint_every_steps needs a checkpoint_dir.")
    if not drivers.DRIVERS[loop].resumes_mid_epoch:
      resuming = [name for name, driver in drivers.DRIVERS.items()
                  if driver.resumes_mid_epoch]
      raise ValueError(
          f"checkpoint_every_steps needs a loop that resumes inside an "
          f"epoch ({', '.join(resuming)}); {loop} starts only at an "
          "epoch's beginning.")


def _check_loop(loop):
  if loop not in drivers.DRIVERS:
    raise ValueError(f"Unknown loop {loop!r}; expected one of "
                     f"{', '.join(drivers.DRIVERS)}.")


def _check_data(name, data):
  if not isinstance(data, tf.data.Dataset):
    raise ValueError(f"{name} must be a batched tf.data.Dataset of (x, y) "
                     f"or (x, y, sample_weight), got {type(data).__name__}.")
  if not isinstance(data.element_spec, tuple) or not (
      2 <= len(data.element_spec) <= 3):
    raise ValueError(f"{name} must yield (x, y) or (x, y, sample_weight) "
                     f"batches, got elements {data.element_spec}.")
  if int(data.cardinality()) == 0:
    raise ValueError(f"{name} is empty: it yields no batches.")
