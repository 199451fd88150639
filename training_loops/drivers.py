"""How a `Trainer`'s steps are driven: the three custom loops.

Each driver runs one epoch over an iterator of distributed batches and
reports progress; they differ only in how much runs per Python call.
"""

import contextlib

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
  batch fetched inside it, so Python never touches the data and the end of
  the data is the `OutOfRangeError` of that fetch. Each epoch looks up the
  traced function for its iterator once (`get_concrete_function`), not at
  every call: for a small model that lookup costs a tenth of a step.
  """

  def __init__(self, trainer, jit_compile=False, steps_per_loop=None):
    del steps_per_loop
    train_step, eval_step = _distributed_steps(trainer, jit_compile)

    @tf.function
    def train_next(iterator):
      return train_step(next(iterator))

    @tf.function
    def eval_next(iterator):
      eval_step(next(iterator))

    self.train_next = train_next
    self.eval_next = eval_next

  def train_epoch(self, iterator, epoch, progress, should_stop=None,
                  first_step=0):
    should_stop = should_stop or _never
    train_next = self.train_next.get_concrete_function(iterator)
    step = first_step
    while not should_stop():
      try:
        loss = train_next(iterator)
      except tf.errors.OutOfRangeError:
        break
      step += 1
      _check_finite(loss, epoch, step)
      progress(step)
    return step

  def evaluate(self, iterator):
    eval_next = self.eval_next.get_concrete_function(iterator)
    with contextlib.suppress(tf.errors.OutOfRangeError):
      while True:
        eval_next(iterator)


class GraphDriver(_Driver):
  """`steps_per_loop` steps (default: the whole epoch) in one
  `tf.function` call, the loop itself in the graph.

  With `jit_compile`, one replica and batches of one static shape (e.g.
  `batch(..., drop_remainder=True)`), XLA compiles the loop with the step:
  each call copies up to `XLA_CHUNK_STEPS` batches into one tensor and runs
  them in one XLA computation, so no step pays the graph executor's per-op
  cost. Otherwise XLA compiles each step alone.
  """

  def __init__(self, trainer, jit_compile=False, steps_per_loop=None):
    if steps_per_loop is not None and steps_per_loop < 1:
      raise ValueError(f"steps_per_loop must be >= 1, got {steps_per_loop}.")
    self.steps_per_loop = steps_per_loop or np.iinfo(np.int32).max
    train_step, eval_step = _distributed_steps(trainer, jit_compile)
    chunk_size = min(XLA_CHUNK_STEPS, self.steps_per_loop)
    train_chunk = _compiled_chunk(trainer) if jit_compile else None

    @tf.function
    def train_steps(iterator, max_steps):
      """Returns (steps run, last loss); stops early at the end of the data
      or at a non-finite loss, so the caller can name the step."""
      if train_chunk and _one_static_batch_shape(iterator, trainer.strategy):
        return _train_in_chunks(train_chunk, chunk_size, iterator, max_steps)
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

# Batches per XLA computation of the graph loop: enough that the call and
# the copy into one tensor cost little per step, few enough to bound the
# copy's memory (64 MNIST batches of 256: 51 MB).
XLA_CHUNK_STEPS = 64


def _distributed_steps(trainer, jit_compile):
  """The distributed train and eval steps, their replica steps optionally
  XLA-compiled (iterators and cross-replica plumbing stay outside XLA)."""
  compile_replica_step = (
      (lambda step: tf.function(step, jit_compile=True)) if jit_compile
      else (lambda step: step))
  return (trainer.distribute(compile_replica_step(trainer.train_replica_step)),
          trainer.distribute(compile_replica_step(trainer.eval_replica_step)))


def _one_static_batch_shape(iterator, strategy):
  """Whether every batch is one plain tensor structure of one known shape."""
  specs = tf.nest.flatten(iterator.element_spec)
  return strategy.num_replicas_in_sync == 1 and all(
      isinstance(spec, tf.TensorSpec) and spec.shape.is_fully_defined()
      for spec in specs)


def _compiled_chunk(trainer):
  """`train_chunk((batches, count))`: the train step on `batches[i]` for
  `i < count`, the loop XLA-compiled with the step; stops after a
  non-finite loss. Returns (steps run, last loss)."""
  def train_chunk(chunk):
    batches, count = chunk

    def train_one(step, loss):
      del loss
      batch = tf.nest.map_structure(lambda stacked: stacked[step], batches)
      return step + 1, trainer.train_replica_step(batch)

    def go_on(step, loss):
      return tf.logical_and(step < count, tf.math.is_finite(loss))

    return tf.while_loop(go_on, train_one, (tf.constant(0), tf.constant(0.0)))
  return trainer.distribute(tf.function(train_chunk, jit_compile=True))


def _train_in_chunks(train_chunk, chunk_size, iterator, max_steps):
  """The graph loop's body on `chunk_size` batches at a time."""
  steps, loss = tf.constant(0), tf.constant(0.0)
  while steps < max_steps:
    batches, count = _next_chunk(iterator, chunk_size, max_steps - steps)
    if count == 0:
      break
    done, loss = train_chunk((batches, count))
    steps += done
    if count < chunk_size or not tf.math.is_finite(loss):
      break
  return steps, loss


def _next_chunk(iterator, size, limit):
  """Up to `min(size, limit)` batches stacked on a new leading axis, padded
  to `size` with copies of the last (so XLA sees one shape), and how many
  are real."""
  specs = iterator.element_spec
  arrays = tf.nest.map_structure(
      lambda spec: tf.TensorArray(spec.dtype, size=size,
                                  element_shape=spec.shape), specs)
  last = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype),
                               specs)
  count = tf.constant(0)
  for _ in tf.range(tf.minimum(size, limit)):
    batch = iterator.get_next_as_optional()
    if not batch.has_value():
      break
    last = batch.get_value()
    arrays = _write(arrays, count, last)
    count += 1
  for padding in tf.range(count, size):
    arrays = _write(arrays, padding, last)
  return tf.nest.map_structure(lambda array: array.stack(), arrays), count


def _write(arrays, index, batch):
  return tf.nest.map_structure(lambda array, value: array.write(index, value),
                               arrays, batch)


def _never():
  return False


def _check_finite(loss, epoch, step):
  value = float(loss)
  if not np.isfinite(value):
    raise NonFiniteLossError(epoch, step, value)
