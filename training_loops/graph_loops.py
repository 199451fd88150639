"""Loops over an iterator's batches inside a graph, as the graph loop and
its XLA chunks read them."""

import tensorflow as tf


def over_batches(iterator, max_steps, step, state, go_on=None):
  """In a graph: `state = step(batch, state)` on each of up to `max_steps`
  next batches of `iterator`, stopping early at the end of the data or once
  `go_on(state)` is false. Returns (steps run, state).

  The step sits in no `tf.cond`: a branch would route every tensor the step
  captures (each variable) through a `Switch`, a cost every step pays. So
  the loop carries the next batch as an optional, fetched after each step,
  and only while a step is due: the iterator stops exactly after the
  batches trained on.
  """
  def fetch(steps, state):
    due = steps < max_steps
    if go_on is not None:
      due = tf.logical_and(due, go_on(state))
    return tf.cond(due, iterator.get_next_as_optional,
                   lambda: tf.experimental.Optional.empty(
                       iterator.element_spec))

  def has_batch(steps, batch, state):
    del steps, state
    return batch.has_value()

  def one_step(steps, batch, state):
    state = step(batch.get_value(), state)
    return steps + 1, fetch(steps + 1, state), state

  start = tf.constant(0)
  steps, _, state = tf.while_loop(has_batch, one_step,
                                  (start, fetch(start, state), state))
  return steps, state
