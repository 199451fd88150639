"""`compare`: loops trained in lockstep on the same batches, and the first
step and variable where they part.

Each loop gets the model, optimizer and driver `train` would build (the same
seed first, so the same initial weights) and the same batches in the same
order: the dataset is read once, an iterator per epoch as `train` opens
them, and replayed to every loop. After every step the loss and every
variable of each loop are compared with the first loop's.

The custom loops (any registered `StepDriver`) are stepped through their own
`stepper`, each call given an iterator over exactly the next batch, so the
step is the loop's real one whatever its `steps_per_call`. A loop that runs
its own epochs (`keras_fit`) runs as `train` runs it, under a `Controller`,
on the replayed batches; the others step from its batch-end callback.
`model.train_on_batch` would not do for fit: it feeds the whole batch to
every replica where fit splits it across them.
"""

import dataclasses
import itertools

import keras
import numpy as np
import tensorflow as tf

from training_loops import drivers, strategies, training
from training_loops.controller import Controller, RunOptions
from training_loops.step import losses_of
from training_loops.supervised_step import (NonFiniteLossError,
                                            TrainingDataError)


@dataclasses.dataclass(frozen=True)
class Divergence:
  """Where `loop` first parted from `reference`.

  Attributes:
    reference, loop: the loops' names.
    step: the global step, from 1, counted across epochs.
    epoch, step_in_epoch: the same step as the 0-based epoch and the step
      in it, from 1 (as `NonFiniteLossError` names them).
    variable: the path (`v.path`) of the first variable beyond the
      tolerance, in the reference's model or optimizers; None when a
      logged loss of the step already was (losses are compared first).
    log: that loss's name in the step's logs (e.g. "loss", "d_loss"), or
      None.
    element: the index of the element with the largest difference beyond
      the tolerance; () for a scalar.
    reference_value, value: that element in the two loops.
    relative_difference: `|value - reference_value| / |reference_value|`.
    elements_beyond, elements: how many elements are beyond the tolerance,
      of how many.
  """
  reference: str
  loop: str
  step: int
  epoch: int
  step_in_epoch: int
  variable: str | None
  log: str | None
  element: tuple
  reference_value: float
  value: float
  relative_difference: float
  elements_beyond: int
  elements: int


@dataclasses.dataclass(frozen=True)
class LockstepReport:
  """What `compare` found; `str()` is the summary for people.

  Attributes:
    loops: the loops compared, the reference first.
    steps_compared: steps every loop ran, the diverging one included.
    rtol, atol: the tolerance: `|value - reference| <= atol + rtol *
      |reference|` for every element.
    first_divergence: a `Divergence`, or None if the loops agreed
      throughout.
  """
  loops: tuple
  steps_compared: int
  rtol: float
  atol: float
  first_divergence: Divergence | None

  @property
  def agreed(self):
    return self.first_divergence is None

  def __str__(self):
    tolerance = f"rtol={self.rtol:g}, atol={self.atol:g}"
    names = f"{', '.join(self.loops[:-1])} and {self.loops[-1]}"
    if self.agreed:
      return (f"{names} agree over {_steps(self.steps_compared)}: every "
              f"loss and variable within {tolerance} of {self.loops[0]}'s.")
    d = self.first_divergence
    what = (d.variable if d.variable is not None
            else "the loss" if d.log == "loss" else f"the log {d.log!r}")
    if d.element:
      what += f"[{', '.join(map(str, d.element))}]"
    before = (f"{names} agreed over the {_steps(d.step - 1)} before."
              if d.step > 1 else "It is the first step.")
    return (f"{d.loop} parts from {d.reference} at step {d.step}, epoch "
            f"{d.epoch} (0-based) step {d.step_in_epoch}: {what} is "
            f"{d.value:.9g} against {d.reference_value:.9g}, a relative "
            f"difference of {d.relative_difference:.3g} ({tolerance}; "
            f"{d.elements_beyond} of {d.elements} elements beyond). "
            f"{before}")


def _steps(count):
  return f"{count} step{'' if count == 1 else 's'}"


def compare(model_fn, optimizer_fn=None, loss=None, data=None, *,
            loops=None, steps=None, rtol=1e-5, atol=1e-6, metrics=(),
            loss_weights=None, strategy=None, seed=0, jit_compile=False,
            optimizer_variables=False):
  """Trains `loops` in lockstep on the first `steps` batches of `data` and
  reports the first step where a logged loss or a variable parts from the
  first loop's.

  Args:
    model_fn, optimizer_fn, loss, metrics, loss_weights, strategy,
      jit_compile: as `train` takes them (a model with its own training
      step, or a `TrainingStep`, takes no optimizer_fn, loss, metrics or
      loss_weights); every loop builds its own step from them.
    data: a `tf.data.Dataset` of batches, read once; pass a freshly built
      one, as to `train`.
    loops: two or more of `LOOPS` (or registered loops: `StepDriver`s and
      at most one that runs its own epochs and calls Keras' batch hooks
      every step, as `keras_fit`); the first is the reference. Default:
      `LOOPS`.
    steps: how many steps to compare, over as many epochs of `data` as
      that takes; default: one epoch.
    rtol, atol: an element agrees when `|value - reference| <= atol + rtol
      * |reference|` (NaN agrees with NaN).
    seed: seeds every build alike, so the loops start from equal weights.
    optimizer_variables: compare the variables of every optimizer the step
      applies (e.g. momentum) too, after the model's.

  Returns:
    A `LockstepReport`.
  """
  loops = _checked_loops(training.LOOPS if loops is None else loops)
  _check_arguments(steps, rtol, atol, seed)
  training.check_data("data", data)
  supervised = training.SupervisedOptions(optimizer_fn, loss, metrics,
                                          loss_weights)
  built = [
      training.build_driver(
          name, model_fn, data, supervised=supervised,
          options=drivers.LoopOptions(jit_compile=jit_compile),
          strategy=strategy, seed=seed)
      for name in loops]
  reference = built[0].trainer
  batches = _first_batches(data, steps,
                           opened=strategies.fit_builds_symbolically(
                               reference.model, reference.strategy))
  lockstep = _Lockstep(loops, built, batches, data, rtol, atol,
                       optimizer_variables)
  own_epochs = [(name, driver) for name, driver in zip(loops, built)
                if not isinstance(driver, drivers.StepDriver)]
  if own_epochs:
    [(name, driver)] = own_epochs
    _run_own_epochs(name, driver, lockstep)
  else:
    try:
      while lockstep.step({}):
        pass
    except tf.errors.InvalidArgumentError as error:
      raise TrainingDataError(lockstep.epoch, error) from error
  return LockstepReport(loops, lockstep.steps_done, rtol, atol,
                        lockstep.divergence)


def _checked_loops(loops):
  """`loops` as a tuple, checked."""
  if isinstance(loops, str) or len(loops) < 2:
    raise ValueError(f"compare needs two or more loops, got {loops!r}; "
                     f"choose from {', '.join(drivers.DRIVERS)}.")
  for name in loops:
    drivers.check_loop(name)
  if len(set(loops)) < len(loops):
    raise ValueError(f"loops must differ, got {loops!r}.")
  own_epochs = [name for name in loops if not issubclass(
      drivers.DRIVERS[name], drivers.StepDriver)]
  if len(own_epochs) > 1:
    raise ValueError(f"At most one loop that runs its own epochs can be "
                     f"compared, got {', '.join(own_epochs)}.")
  return tuple(loops)


def _check_arguments(steps, rtol, atol, seed):
  if steps is not None and (not isinstance(steps, int) or steps < 1):
    raise ValueError(f"steps must be a positive int or None (one epoch), "
                     f"got {steps!r}.")
  for name, value in (("rtol", rtol), ("atol", atol)):
    if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
      raise ValueError(f"{name} must be a finite number >= 0, got "
                       f"{value!r}.")
  if not isinstance(seed, int):
    raise ValueError(f"seed must be an int (the loops start from equal "
                     f"weights only when seeded alike), got {seed!r}.")


def _first_batches(data, steps, opened=False):
  """`[(epoch, step in it, batch)]`: the first `steps` batches as NumPy
  arrays (default: one epoch), an iterator per epoch as `train` opens
  them, after one more when `opened` (`train` opens the data once before
  training under a strategy, as fit does), so a reshuffling dataset gives
  `train`'s order."""
  if opened:
    iter(data)
  if steps is None and data.cardinality() == tf.data.INFINITE_CARDINALITY:
    raise ValueError("data repeats forever: pass steps.")
  batches, epoch = [], 0
  while not batches or (steps is not None and len(batches) < steps):
    wanted = None if steps is None else steps - len(batches)
    epoch_batches = [
        (epoch, index + 1, tf.nest.map_structure(np.asarray, batch))
        for index, batch in enumerate(itertools.islice(data, wanted))]
    if not epoch_batches:
      raise ValueError("data is empty: it yields no batches.")
    batches += epoch_batches
    epoch += 1
  return batches


class _Lockstep:
  """Steps the `StepDriver` loops and compares every loop after each step.

  Args:
    names, built: the loops' names and drivers, the reference first.
    batches: `_first_batches` of `data`.
  """

  def __init__(self, names, built, batches, data, rtol, atol,
               optimizer_variables):
    self.names, self.batches = names, batches
    self.rtol, self.atol = rtol, atol
    self.replay = _replayed([batch for _, _, batch in batches], data)
    self.stepped = [(name, driver) for name, driver in zip(names, built)
                    if isinstance(driver, drivers.StepDriver)]
    self.variables = [_variables(driver.trainer, optimizer_variables)
                      for driver in built]
    reference_shapes = [v.shape for v in self.variables[0]]
    for name, variables in zip(names[1:], self.variables[1:]):
      if [v.shape for v in variables] != reference_shapes:
        raise ValueError(f"{name}'s variables differ from {names[0]}'s in "
                         f"number or shape: nothing to compare them by.")
    self.steps_done = 0
    self.divergence = None

  @property
  def epoch(self):
    """The epoch of the step in progress."""
    return self.batches[self.steps_done][0]

  @property
  def finished(self):
    return (self.divergence is not None
            or self.steps_done == len(self.batches))

  def step(self, logs):
    """Trains every `StepDriver` loop on the next batch and compares all;
    `logs` holds the step's logs of any loop that stepped itself. Returns
    whether there are steps left to compare."""
    next_batch = self.replay.skip(self.steps_done).take(1)
    for name, driver in self.stepped:
      iterator = iter(driver.trainer.strategy.experimental_distribute_dataset(
          next_batch))
      # Running results start afresh, so the logs are this step's alone,
      # as the loop that steps itself reports them.
      driver.trainer.reset()
      _, logs[name] = driver.stepper(iterator)(1)
    self.steps_done += 1
    self.divergence = self._first_difference(logs)
    return not self.finished

  def _first_difference(self, logs):
    epoch, step_in_epoch, _ = self.batches[self.steps_done - 1]
    reference_name = self.names[0]
    where = dict(reference=reference_name, step=self.steps_done, epoch=epoch,
                 step_in_epoch=step_in_epoch)
    # The losses every loop logs (fit logs the metrics too).
    names = [key for key in losses_of(logs[reference_name])
             if all(key in logs[name] for name in self.names)]
    reference_values = [v.numpy() for v in self.variables[0]]
    for name, variables in zip(self.names[1:], self.variables[1:]):
      for key in names:
        parted = _parting(float(logs[reference_name][key]),
                          float(logs[name][key]), self.rtol, self.atol)
        if parted:
          return Divergence(loop=name, variable=None, log=key, **where,
                            **parted)
      for reference_variable, reference_value, variable in zip(
          self.variables[0], reference_values, variables):
        parted = _parting(reference_value, variable.numpy(), self.rtol,
                          self.atol)
        if parted:
          return Divergence(loop=name, variable=reference_variable.path,
                            log=None, **where, **parted)
    return None


def _replayed(batches, data):
  """A dataset of `batches` (NumPy structures) with `data`'s element spec,
  so each loop traces the steps it would trace for `data`, and options.

  In-graph: each component is stored padded to the largest batch and cut
  back to each batch's shape. (With `from_generator`, a loop under
  MirroredStrategy trained on other batches once another loop's iterator
  was open.)
  """
  specs = tf.nest.flatten(data.element_spec)
  stored = []
  for index in range(len(specs)):
    parts = [tf.nest.flatten(batch)[index] for batch in batches]
    shapes = np.array([part.shape for part in parts], np.int64)
    padded = np.zeros((len(parts), *shapes.max(axis=0)), parts[0].dtype)
    for row, part in zip(padded, parts):
      row[tuple(map(slice, part.shape))] = part
    stored.append((padded, shapes))

  def cut(*components):
    return tf.nest.pack_sequence_as(data.element_spec, [
        tf.ensure_shape(tf.slice(padded, tf.zeros_like(shape), shape),
                        spec.shape)
        for (padded, shape), spec in zip(components, specs)])
  replay = tf.data.Dataset.from_tensor_slices(tuple(stored)).map(cut)
  return replay.with_options(data.options())


def _variables(trainer, optimizer_variables):
  optimizers = trainer.optimizers().values() if optimizer_variables else ()
  return [*trainer.model.variables,
          *(v for optimizer in optimizers for v in optimizer.variables)]


def _parting(reference, value, rtol, atol):
  """The `Divergence` fields of `value` against `reference` (arrays of one
  shape), or None if every element is within the tolerance."""
  reference = np.asarray(reference, np.float64)
  value = np.asarray(value, np.float64)
  beyond = ~np.isclose(value, reference, rtol=rtol, atol=atol,
                       equal_nan=True)
  if not beyond.any():
    return None
  difference = np.abs(value - reference)
  difference = np.where(np.isnan(difference), np.inf, difference)
  element = np.unravel_index(np.argmax(np.where(beyond, difference, -1.0)),
                             beyond.shape)
  with np.errstate(divide="ignore", invalid="ignore"):
    relative = difference[element] / np.abs(reference[element])
  return dict(element=tuple(int(i) for i in element),
              reference_value=float(reference[element]),
              value=float(value[element]),
              relative_difference=float(relative),
              elements_beyond=int(beyond.sum()), elements=beyond.size)


def _run_own_epochs(name, driver, lockstep):
  """Runs `driver` under a `Controller` on the replayed batches, as one
  epoch, the lockstep advancing from its batch hooks."""
  controller = Controller(driver, lockstep.replay, RunOptions(
      epochs=1, callbacks=(_StepTheOthers(name, lockstep),), verbose=0))
  try:
    controller.run()
  except NonFiniteLossError:
    # Fit checks the last step's loss at the epoch's end, after the
    # lockstep compared it: NaN in every loop alike is agreement.
    if not lockstep.finished:
      raise
  if not lockstep.finished:
    raise ValueError(
        f"Loop {name!r} called on_train_batch_end for {lockstep.steps_done} "
        f"of {len(lockstep.batches)} steps; compare needs a loop that runs "
        "its own epochs to call it after every step.")


class _StepTheOthers(keras.callbacks.Callback):
  """Advances the lockstep after each step of a loop that runs its own
  epochs. Overriding a batch-end hook also keeps Keras from running batch
  hooks in a thread of their own: fit waits for the comparison."""

  def __init__(self, name, lockstep):
    super().__init__()
    self.name, self.lockstep = name, lockstep

  def on_train_batch_begin(self, batch, logs=None):
    # As `train_on_batch` does: fit's logs then hold this step's loss, not
    # the epoch's running mean.
    self.model.reset_metrics()

  def on_train_batch_end(self, batch, logs=None):
    if not self.lockstep.step({self.name: logs}):
      self.model.stop_training = True
