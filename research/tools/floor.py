"""TensorFlow's raw-op floor for each kind of loop, on the benchmark's MLP.

The benchmark's MLP (784-300-100-10, ReLU, softmax cross-entropy, SGD)
trained with raw TensorFlow ops, no Keras layers, loss, metrics or
optimizer. A loop of ours does more in a step (Keras' layers and optimizer,
metrics, hooks, a finite-loss check), so its floor is the fastest a loop of
its kind can go here.

Kinds, as the loops they bound:
  eager:     a Python loop of eager steps on the batches (the eager loop);
  function:  one `tf.function` call a step, the batch fetched inside from a
             `tf.data` iterator (the function loop);
  graph:     the whole epoch in one `tf.function` (the graph loop);
  graph_xla: the whole epoch in one XLA computation (the graph loop with
             `jit_compile`).
"""

import time

import numpy as np
import tensorflow as tf

KINDS = ("eager", "function", "graph", "graph_xla")
LAYER_SIZES = (784, 300, 100, 10)
LEARNING_RATE = 0.01


class RawMLP:
  """The MLP as plain `tf.Variable`s (Glorot-uniform kernels, zero biases,
  as Keras' Dense) and its SGD step in raw ops."""

  def __init__(self, seed):
    self.variables = []
    for index, (fan_in, fan_out) in enumerate(zip(LAYER_SIZES,
                                                  LAYER_SIZES[1:])):
      limit = np.sqrt(6.0 / (fan_in + fan_out))
      self.variables += [
          tf.Variable(tf.random.stateless_uniform(
              [fan_in, fan_out], [seed, index], -limit, limit)),
          tf.Variable(tf.zeros([fan_out]))]

  def step(self, x, y):
    """One SGD step on the batch; returns its mean loss."""
    with tf.GradientTape() as tape:
      hidden = x
      for index in range(0, len(self.variables), 2):
        kernel, bias = self.variables[index:index + 2]
        hidden = tf.nn.bias_add(tf.matmul(hidden, kernel), bias)
        if index + 2 < len(self.variables):
          hidden = tf.nn.relu(hidden)
      loss = tf.reduce_mean(
          tf.nn.sparse_softmax_cross_entropy_with_logits(y, hidden))
    for variable, gradient in zip(self.variables,
                                  tape.gradient(loss, self.variables)):
      variable.assign_sub(LEARNING_RATE * gradient)
    return loss


def epoch_runner(kind, model, x, y, batch_size):
  """`run()`: one epoch of `model.step` over `x, y` in batches of
  `batch_size` (the remainder dropped, as the benchmark's data), driven as
  `kind` says; returns the number of steps."""
  steps = len(x) // batch_size
  xs = tf.constant(x[:steps * batch_size].reshape(steps, batch_size, -1))
  ys = tf.constant(y[:steps * batch_size].reshape(steps, batch_size))
  if kind == "eager":
    def run():
      for index in range(steps):
        loss = model.step(xs[index], ys[index])
      float(loss)
      return steps
    return run
  if kind == "function":
    dataset = tf.data.Dataset.from_tensor_slices((xs, ys)).repeat()
    iterator = iter(dataset)
    step = tf.function(lambda iterator: model.step(*next(iterator)))
    concrete = step.get_concrete_function(iterator)

    def run():
      for _ in range(steps):
        loss = concrete(iterator)
      float(loss)
      return steps
    return run
  if kind in ("graph", "graph_xla"):
    @tf.function(jit_compile=kind == "graph_xla")
    def whole_epoch(xs, ys):
      loss = tf.constant(0.0)
      for index in tf.range(steps):
        loss = model.step(xs[index], ys[index])
      return loss

    def run():
      float(whole_epoch(xs, ys))
      return steps
    return run
  raise ValueError(f"Unknown floor kind {kind!r}; expected one of "
                   f"{', '.join(KINDS)}.")


def measure(kind, x, y, batch_size, repeats, seed):
  """Steps/s of `repeats` epochs after a warm-up epoch (tracing,
  compilation), on a fresh model."""
  run = epoch_runner(kind, RawMLP(seed), x, y, batch_size)
  run()
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    steps = run()
    rates.append(steps / (time.perf_counter() - start))
  return rates
