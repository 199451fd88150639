"""How a run's steps are driven: the driver protocol, the registry of loops,
and the three custom loops.

A `Controller` owns everything around the epochs (callbacks, validation,
checkpoints, stop requests, history, progress, errors); a driver only runs
the steps of a `step.TrainingStep`. The custom loops share `StepDriver`,
which owns an epoch's bookkeeping (stop checks, step counting, the
finite-loss check, the batch-level hooks around each call); each supplies
only how many steps one Python call runs and how.
"""

import abc
import dataclasses

import numpy as np
import tensorflow as tf

from training_loops import step as step_lib
from training_loops import xla_chunks
from training_loops.graph_loops import over_batches

DRIVERS = {}


def register(name):
  """Class decorator: makes a `Driver` subclass `train(loop=name)`."""
  def add(driver_class):
    if name in DRIVERS:
      raise ValueError(f"A loop named {name!r} is already registered.")
    DRIVERS[name] = driver_class
    return driver_class
  return add


def check_loop(name):
  """Refuses in one line a loop that is not registered."""
  if name not in DRIVERS:
    raise ValueError(f"Unknown loop {name!r}; expected one of "
                     f"{', '.join(DRIVERS)}.")


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  """How a loop runs its steps, as `train` was asked.

  Attributes:
    steps_per_loop: steps per `tf.function` call of the graph loop (None: a
      whole epoch); `steps_per_execution` for `keras_fit`.
    jit_compile: XLA-compile the step (function, graph and keras_fit).
  """
  steps_per_loop: int | None = None
  jit_compile: bool = False

  def __post_init__(self):
    if self.steps_per_loop is not None and self.steps_per_loop < 1:
      raise ValueError(
          f"steps_per_loop must be >= 1, got {self.steps_per_loop}.")


class Driver(abc.ABC):
  """The protocol between a `Controller` and one way of running steps.

  Args:
    trainer: the `step.TrainingStep` whose steps (for `model.fit`, whose
      model) it runs.
    options: `LoopOptions`; a driver refuses the ones it cannot honour.
  """

  def __init__(self, trainer, options=LoopOptions()):
    self.check_options(options)
    self.trainer = trainer
    self.options = options

  # Whether a checkpoint saved inside an epoch can be resumed (model.fit
  # starts only at an epoch's beginning).
  resumes_mid_epoch = True
  # Whether it runs the step op by op (so it cannot compile it).
  runs_eagerly = False
  # Whether it honours `LoopOptions.steps_per_loop`; it refuses it if not.
  takes_steps_per_loop = True
  # Whether it opens the training data once before the first epoch under a
  # strategy other than the default, as model.fit does.
  opens_data_before_training = False

  @classmethod
  def check_options(cls, options):
    """Refuses in one line an option this loop would ignore; `train`
    asks before it builds anything, so this is the first word on it."""
    if options.steps_per_loop is not None and not cls.takes_steps_per_loop:
      raise ValueError(f"steps_per_loop needs loop='graph' or 'keras_fit'; "
                       f"{cls.__name__} ignores it.")
    if options.jit_compile and cls.runs_eagerly:
      raise ValueError("jit_compile needs loop='function', 'graph' or "
                       "'keras_fit'.")

  @abc.abstractmethod
  def evaluate(self, iterator, hooks=None):
    """Evaluates every batch of `iterator` into the step's eval results,
    reset first; `hooks` (test-batch `BatchHooks`) run around each call.
    Returns the last batch's logs (None for no batch)."""


class StepDriver(Driver):
  """A loop that runs the step's calls as the `Controller` asks, epoch by
  epoch: `stepper(iterator)(limit)` trains up to `limit` steps and gives
  back their logs (a loop that runs its own epochs, as `model.fit` does,
  is a `Driver` with a `run(controller)` of its own instead).

  Subclasses set `steps_per_call` and implement `stepper` and
  `eval_stepper`;
  one that sets `steps_per_call` from `options.steps_per_loop` says so with
  `takes_steps_per_loop`, and the others refuse it.
  """

  steps_per_call = 1
  takes_steps_per_loop = False

  def evaluate(self, iterator, hooks=None):
    """Runs the eval step on every batch of `iterator`, from reset eval
    results; `hooks` (the controller's test-batch `BatchHooks`, given the
    last logs) run around each call. Returns the last batch's logs."""
    self.trainer.reset_eval()
    run_steps = self.eval_stepper(iterator)
    done, last_logs = 0, None
    while True:
      if hooks:
        hooks.begin(done)
      steps, logs = run_steps()
      done += steps
      if steps:
        last_logs = logs
        if hooks:
          hooks.end(done, last_logs)
      if steps < self.steps_per_call:
        return last_logs

  @abc.abstractmethod
  def stepper(self, iterator):
    """Returns `run(limit)`: trains up to `limit` (<= `steps_per_call`)
    steps on `iterator`'s next batches and returns `(steps run, the last
    step's logs)`; fewer steps than `limit` mean the data ended (or a loss
    is not finite)."""

  @abc.abstractmethod
  def eval_stepper(self, iterator):
    """Returns `run()`: evaluates up to `steps_per_call` batches of
    `iterator` and returns `(how many, the last one's logs)`; fewer mean
    the data ended."""


@register("eager")
class EagerDriver(StepDriver):
  """The step runs op by op in Python, so a breakpoint or a print in a
  layer's `call`, the loss or a model's own `train_step` sees every step's
  real tensors (the supervised step compiles its update: see
  `Trainer.train_replica_step`)."""

  runs_eagerly = True

  def __init__(self, trainer, options=LoopOptions()):
    super().__init__(trainer, options)
    self.train_step = trainer.distribute(trainer.train_replica_step)
    self.eval_step = trainer.distribute(trainer.eval_replica_step)

  def stepper(self, iterator):
    def run(limit):
      del limit  # always 1
      batch = next(iterator, None)
      return (0, None) if batch is None else (1, self.train_step(batch))
    return run

  def eval_stepper(self, iterator):
    def run():
      batch = next(iterator, None)
      return (0, None) if batch is None else (1, self.eval_step(batch))
    return run


@register("function")
class FunctionDriver(StepDriver):
  """The same step compiled by `tf.function`, one call per step from a
  Python loop.

  As `model.fit` does, the iterator is passed into the function and the
  batch fetched inside it, so Python never touches the data and the end of
  the data is the `OutOfRangeError` of that fetch. Each epoch looks up the
  traced function for its iterator once (`get_concrete_function`), not at
  every call: for a small model that lookup is a sizeable part of a
  step.
  """

  def __init__(self, trainer, options=LoopOptions()):
    super().__init__(trainer, options)
    train_step, eval_step = _distributed_steps(trainer, options.jit_compile)

    def train_next(iterator):
      return train_step(next(iterator))

    def eval_next(iterator):
      return eval_step(next(iterator))

    self.train_next = step_lib.own_function(train_next)
    self.eval_next = step_lib.own_function(eval_next)

  def stepper(self, iterator):
    train_next = self.train_next.get_concrete_function(iterator)

    def run(limit):
      del limit  # always 1
      try:
        return 1, train_next(iterator)
      except tf.errors.OutOfRangeError:
        return 0, None
    return run

  def eval_stepper(self, iterator):
    eval_next = self.eval_next.get_concrete_function(iterator)

    def run():
      try:
        return 1, eval_next(iterator)
      except tf.errors.OutOfRangeError:
        return 0, None
    return run


@register("graph")
class GraphDriver(StepDriver):
  """`steps_per_loop` steps (default: the whole epoch) in one
  `tf.function` call, the loop itself in the graph; a stop request is seen
  between calls.

  With `jit_compile`, one replica and batches of one static shape (e.g.
  `batch(..., drop_remainder=True)`), XLA compiles the loop with the step
  (`xla_chunks`). Otherwise XLA compiles each step alone.
  """

  takes_steps_per_loop = True

  def __init__(self, trainer, options=LoopOptions()):
    super().__init__(trainer, options)
    self.steps_per_call = options.steps_per_loop or np.iinfo(np.int32).max
    train_step, eval_step = _distributed_steps(trainer, options.jit_compile)
    chunk_size = min(xla_chunks.CHUNK_STEPS, self.steps_per_call)
    train_chunk = (xla_chunks.compiled_chunk(trainer) if options.jit_compile
                   else None)

    def train_steps(iterator, max_steps):
      """Returns (steps run, last logs); stops early at the end of the data
      or at a non-finite loss, so the caller can name the step."""
      if train_chunk and xla_chunks.applies(iterator, trainer.strategy):
        return xla_chunks.train_in_chunks(
            train_chunk, chunk_size, iterator, max_steps,
            step_lib.no_logs(trainer))
      return over_batches(iterator, max_steps,
                          lambda batch, logs: train_step(batch),
                          step_lib.no_logs(trainer), step_lib.all_finite)

    def eval_steps(iterator, max_steps):
      return over_batches(
          iterator, max_steps, lambda batch, logs: eval_step(batch),
          step_lib.no_logs(trainer, training=False))

    self.train_steps = step_lib.own_function(train_steps)
    self.eval_steps = step_lib.own_function(eval_steps)

  def stepper(self, iterator):
    full_call = tf.constant(self.steps_per_call)

    def run(limit):
      # A tensor argument: a shorter call does not retrace.
      max_steps = full_call if limit == self.steps_per_call else (
          tf.constant(limit))
      steps, logs = self.train_steps(iterator, max_steps)
      return int(steps), logs
    return run

  def eval_stepper(self, iterator):
    max_steps = tf.constant(self.steps_per_call)

    def run():
      steps, logs = self.eval_steps(iterator, max_steps)
      return int(steps), logs
    return run


def _distributed_steps(trainer, jit_compile):
  """The distributed train and eval steps, their replica steps optionally
  XLA-compiled (iterators and cross-replica plumbing stay outside XLA)."""
  if not jit_compile:
    return (trainer.distribute(trainer.train_replica_step),
            trainer.distribute(trainer.eval_replica_step))
  # The batch guard inside the compiled step: around it, a mirrored
  # strategy's replica thread could not `merge_call` from inside XLA.
  return tuple(
      trainer.distribute(tf.function(step_lib.guarded_by_batch(replica_step),
                                     jit_compile=True), guarded=False)
      for replica_step in (trainer.train_replica_step,
                           trainer.eval_replica_step))

