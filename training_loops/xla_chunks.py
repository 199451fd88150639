"""The graph loop's XLA path: many steps in one XLA computation.

XLA compiles a `tf.while_loop` over a chunk of batches together with the
train step, so no step pays the graph executor's per-op cost. XLA needs one
static shape, so each chunk is `CHUNK_STEPS` batches stacked on a new
leading axis (a short last chunk padded with copies of its last batch, the
padding never trained on), and iterators and cross-replica plumbing stay
outside XLA: this path serves one replica with batches of one static shape.
"""

import tensorflow as tf

from training_loops import strategies
from training_loops.graph_loops import over_batches
from training_loops.step import all_finite, no_logs

# Batches per XLA computation: enough that the call and the copy into one
# tensor cost little per step, few enough to bound the copy's memory (64
# MNIST batches of 256: 51 MB), and that the read-ahead overlaps most of
# the reading (none of the first chunk's).
CHUNK_STEPS = 64


def applies(iterator, strategy):
  """Whether every batch is one plain tensor structure of one known shape,
  on one replica, run in the caller's thread: a mirrored strategy's
  replica thread cannot `merge_call` (the optimizer's update) from inside
  the compiled chunk."""
  specs = tf.nest.flatten(iterator.element_spec)
  return (strategy.num_replicas_in_sync == 1
          and not strategies.runs_replicas_in_threads(strategy)) and all(
      isinstance(spec, tf.TensorSpec) and spec.shape.is_fully_defined()
      for spec in specs)


def compiled_chunk(trainer):
  """`train_chunk((batches, count))`: the train step on `batches[i]` for
  `i < count`, the loop XLA-compiled with the step; stops after a
  non-finite loss. Returns (steps run, last logs)."""
  def train_chunk(chunk):
    batches, count = chunk

    def train_one(step, logs):
      del logs
      batch = tf.nest.map_structure(lambda stacked: stacked[step], batches)
      return step + 1, trainer.train_replica_step(batch)

    def go_on(step, logs):
      return tf.logical_and(step < count, all_finite(logs))

    return tf.while_loop(
        go_on, train_one,
        (tf.constant(0), no_logs(trainer)))
  return trainer.distribute(tf.function(train_chunk, jit_compile=True))


def train_in_chunks(train_chunk, chunk_size, iterator, max_steps, no_logs):
  """Up to `max_steps` steps from `iterator`, `chunk_size` batches per XLA
  computation; returns (steps run, last logs; `no_logs` before any),
  stopping early at the end of the data or a non-finite loss. Traced into
  the graph loop's function.

  The next chunk is read while XLA trains on this one: the two share no
  state, so the graph runs them at once, and reading the batches (an eighth
  of a step at batch 32) costs no time when a core is free. The read-ahead
  never goes past `max_steps`, so at the end of a call the iterator stands
  exactly after the steps trained (a non-finite loss ends the run anyway).
  """
  steps, logs = tf.constant(0), no_logs
  batches, count = _next_chunk(iterator, chunk_size, max_steps)
  while count > 0:
    # A short chunk means the data or `max_steps` ended: nothing to read.
    ahead = tf.where(count == chunk_size, max_steps - steps - count, 0)
    next_batches, next_count = _next_chunk(iterator, chunk_size, ahead)
    done, logs = train_chunk((batches, count))
    steps += done
    if not all_finite(logs):
      break
    batches, count = next_batches, next_count
  return steps, logs


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

  def write(batch, state):
    arrays, _, count = state
    # A distributed iterator's batches (one-device and one-replica mirrored
    # strategies) lose the static batch size its element spec has.
    batch = tf.nest.map_structure(
        lambda value, spec: tf.ensure_shape(value, spec.shape), batch, specs)
    return _write(arrays, count, batch), batch, count + 1

  count, (arrays, last, _) = over_batches(
      iterator, tf.minimum(size, limit), write,
      (arrays, last, tf.constant(0)))
  for padding in tf.range(count, size):
    arrays = _write(arrays, padding, last)
  return tf.nest.map_structure(lambda array: array.stack(), arrays), count


def _write(arrays, index, batch):
  return tf.nest.map_structure(lambda array, value: array.write(index, value),
                               arrays, batch)
