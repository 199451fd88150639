"""How a `Trainer`'s steps are driven: the three custom loops.

Each driver runs one epoch over an iterator of distributed batches and
reports progress; they differ only in how much runs per Python call.
"""

import numpy as np
import tensorflow as tf

from training_loops.trainer import NonFiniteLossError


class _Driver:
  """Steps through an epoch one eager `step` call per batch."""

  def __init__(self, trainer, jit_compile=False, steps_per_loop=None):
    if jit_compile:
      raise ValueError("jit_compile needs loop='function' or 'graph'.")
    del steps_per_loop
    self.train_step, self.eval_step = _distributed_steps(trainer, False)

  def train_epoch(self, iterator, epoch, progress, should_stop=None,
                  first_step=0):
    """Trains on `iterator`'s batches until it ends or `should_stop()`;
    returns the epoch's step count, starting from `first_step` (the steps
    a resumed epoch had already done)."""
    should_stop = should_stop or _never
    step = first_step
    for batch in iterator:
      if should_stop():
        break
      loss = self.train_step(batch)
      step += 1
      _check_finite(loss, epoch, step)
      progress(step)
    return step

  def evaluate(self, iterator):
    for batch in iterator:
      self.eval_step(batch)


class EagerDriver(_Driver):
  """Every op of every step runs eagerly under `tf.GradientTape`."""


class FunctionDriver(_Driver):
  """The same step compiled by `tf.function`, one call per step from a
  Python loop.

  As `model.fit` does, the iterator is passed into the function and the
  batch fetched inside it: Python never touches the data, and the function
  traces once for every batch shape (a partial last batch included).
  """

  def __init__(self, trainer, jit_compile=False, steps_per_loop=None):
    del steps_per_loop
    train_step, eval_step = _distributed_steps(trainer, jit_compile)

    @tf.function
    def train_next(iterator):
      """Returns (whether a batch was left, its loss)."""
      batch = iterator.get_next_as_optional()
      loss = tf.constant(0.0)
      if batch.has_value():
        loss = train_step(batch.get_value())
      return batch.has_value(), loss

    @tf.function
    def eval_next(iterator):
      batch = iterator.get_next_as_optional()
      if batch.has_value():
        eval_step(batch.get_value())
      return batch.has_value()

    self.train_next = train_next
    self.eval_next = eval_next

  def train_epoch(self, iterator, epoch, progress, should_stop=None,
                  first_step=0):
    should_stop = should_stop or _never
    step = first_step
    while not should_stop():
      has_batch, loss = self.train_next(iterator)
      if not has_batch:
        return step
      step += 1
      _check_finite(loss, epoch, step)
      progress(step)
    return step

  def evaluate(self, iterator):
    while self.eval_next(iterator):
      pass


class GraphDriver(_Driver):
  """`steps_per_loop` steps (default: the whole epoch) in one
  `tf.function` call, the loop itself in the graph."""

  def __init__(self, trainer, jit_compile=False, steps_per_loop=None):
    if steps_per_loop is not None and steps_per_loop < 1:
      raise ValueError(f"steps_per_loop must be >= 1, got {steps_per_loop}.")
    self.steps_per_loop = steps_per_loop or np.iinfo(np.int32).max
    train_step, eval_step = _distributed_steps(trainer, jit_compile)

    @tf.function
    def train_steps(iterator, max_steps):
      """Returns (steps run, last loss); stops early at the end of the data
      or at a non-finite loss, so the caller can name the step."""
      steps, loss = tf.constant(0), tf.constant(0.0)
      for _ in tf.range(max_steps):
        batch = iterator.get_next_as_optional()
        if not batch.has_value():
          break
        loss = train_step(batch.get_value())
        steps += 1
        if not tf.math.is_finite(loss):
          break
      return steps, loss

    @tf.function
    def evaluate(iterator):
      for batch in iterator:
        eval_step(batch)

    self.train_steps = train_steps
    self._evaluate = evaluate

  def train_epoch(self, iterator, epoch, progress, should_stop=None,
                  first_step=0):
    """As `EagerDriver.train_epoch`; a stop request is seen between calls,
    so with the default `steps_per_loop` only at the epoch's end."""
    should_stop = should_stop or _never
    done = first_step
    max_steps = tf.constant(self.steps_per_loop)
    while not should_stop():
      steps, loss = self.train_steps(iterator, max_steps)
      steps = int(steps)
      done += steps
      if steps:
        _check_finite(loss, epoch, done)
        progress(done)
      if steps < self.steps_per_loop:
        break
    return done

  def evaluate(self, iterator):
    self._evaluate(iterator)


DRIVERS = {"eager": EagerDriver, "function": FunctionDriver,
           "graph": GraphDriver}


def _distributed_steps(trainer, jit_compile):
  """The distributed train and eval steps, their replica steps optionally
  XLA-compiled (iterators and cross-replica plumbing stay outside XLA)."""
  compile_replica_step = (
      (lambda step: tf.function(step, jit_compile=True)) if jit_compile
      else (lambda step: step))
  return (trainer.distribute(compile_replica_step(trainer.train_replica_step)),
          trainer.distribute(compile_replica_step(trainer.eval_replica_step)))


def _never():
  return False


def _check_finite(loss, epoch, step):
  value = float(loss)
  if not np.isfinite(value):
    raise NonFiniteLossError(epoch, step, value)
