"""Tiny models, datasets and checks shared by the training-loop tests."""

import os
import time

import keras
import numpy as np
import tensorflow as tf

import layers
import losses
import training_loops

# The loops `model.fit` is the reference for.
CUSTOM_LOOPS = tuple(loop for loop in training_loops.LOOPS
                     if loop != "keras_fit")


def classification_data(examples=50, batch_size=16, features=4, classes=3,
                        seed=0, shuffle=False, sample_weights=False,
                        drop_remainder=False):
  """A batched dataset, by default with a partial last batch (50 = 3 x 16
  + 2); `drop_remainder` gives every batch one static shape."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(examples, features)).astype("float32")
  y = (x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1)
  y = np.minimum(y, classes - 1)
  elements = (x, y)
  if sample_weights:
    elements += (rng.uniform(0.5, 2.0, size=examples).astype("float32"),)
  dataset = tf.data.Dataset.from_tensor_slices(elements)
  if shuffle:
    dataset = dataset.shuffle(examples, seed=seed,
                              reshuffle_each_iteration=True)
  return dataset.batch(batch_size, drop_remainder=drop_remainder)


def classifier(features=4, classes=3, dropout_seed=None, batch_norm=True):
  """Dense -> (BatchNorm) -> (Dropout) -> softmax, from our layers."""
  stack = [keras.Input((features,)), layers.Dense(8, "relu")]
  if batch_norm:
    stack.append(layers.BatchNormalization())
  if dropout_seed is not None:
    stack.append(layers.Dropout(0.25, seed=dropout_seed))
  stack.append(layers.Dense(classes, "softmax"))
  return keras.Sequential(stack)


def two_regressions(features=4):
  """A functional model with two outputs, "a" and "b": one Dense each."""
  inputs = keras.Input((features,))
  return keras.Model(inputs, {"a": layers.Dense(1, name="a")(inputs),
                              "b": layers.Dense(1, name="b")(inputs)})


def sgd(learning_rate=0.1):
  return lambda: keras.optimizers.SGD(learning_rate, momentum=0.9)


def accuracy():
  return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


class ShardRecorder(keras.layers.Layer):
  """Passes its inputs through; in training, adds the examples it saw and
  their sum to variables each replica holds a copy of (synchronized on
  read), so a test can read what every replica was given (`seen`)."""

  def build(self, input_shape):
    del input_shape
    self.totals = [tf.Variable(
        0.0, trainable=False,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM) for _ in range(2)]

  def call(self, inputs, training=False):
    if training:
      self.totals[0].assign_add(tf.cast(tf.shape(inputs)[0], tf.float32))
      self.totals[1].assign_add(tf.reduce_sum(inputs))
    return inputs

  def seen(self, strategy):
    """`(examples, their sum)` of each of this process's replicas."""
    counts, sums = (strategy.experimental_local_results(total)
                    for total in self.totals)
    return [(float(count), float(total))
            for count, total in zip(counts, sums)]


def recorded_classifier(recorders):
  """`classifier(batch_norm=False)` behind a `ShardRecorder`, which is
  appended to `recorders`."""
  recorders.append(ShardRecorder())
  return keras.Sequential([keras.Input((4,)), recorders[-1],
                           *classifier(batch_norm=False).layers])


def run_loop(loop, epochs=2, data=None, **kwargs):
  """`training_loops.train` on the tiny classifier (with dropout) and
  weighted classification data, unless `kwargs` say otherwise."""
  kwargs.setdefault("metrics", [accuracy()])
  kwargs.setdefault("seed", 3)
  kwargs.setdefault("verbose", 0)
  return training_loops.train(
      kwargs.pop("model_fn", lambda: classifier(dropout_seed=7)),
      kwargs.pop("optimizer_fn", sgd()),
      kwargs.pop("loss", losses.SparseCategoricalCrossentropy()),
      data if data is not None else classification_data(sample_weights=True),
      loop=loop, epochs=epochs, **kwargs)


def assert_same_run(history, reference, rtol, atol=0.0):
  """Two `train` runs ended with the same weights and per-epoch history."""
  for weight, expected in zip(history.model.get_weights(),
                              reference.model.get_weights()):
    np.testing.assert_allclose(weight, expected, rtol=rtol, atol=atol)
  for key, values in reference.history.items():
    np.testing.assert_allclose(history.history[key], values, rtol=rtol,
                               err_msg=key)


def max_weight_difference(history, reference):
  """The largest absolute difference between two runs' final weights."""
  return max(np.max(np.abs(weight - expected)) for weight, expected in zip(
      history.model.get_weights(), reference.model.get_weights()))


def wait_for_epochs(checkpoint_dir, epochs, process, timeout=120):
  """Waits until the run in `process` has checkpointed `epochs` epochs:
  its newest checkpoint, whose state file TensorFlow writes last, says so
  (history.json is written before the checkpoint, which a loaded machine
  may take a while to follow)."""
  deadline = time.monotonic() + timeout
  while process.poll() is None:
    if _checkpointed_epochs(checkpoint_dir) >= epochs:
      return
    assert time.monotonic() < deadline, f"no epoch {epochs} in {timeout} s"
    time.sleep(0.05)
  raise AssertionError(f"the run ended early: {process.returncode}")


def _checkpointed_epochs(checkpoint_dir):
  latest = tf.train.latest_checkpoint(os.fspath(checkpoint_dir))
  if latest is None:
    return 0
  return int(tf.train.load_checkpoint(latest).get_tensor(
      "epochs_done/.ATTRIBUTES/VARIABLE_VALUE"))


class Switch:
  """A plain object: Keras would store a dict attribute as a tracked copy."""
  on = False


class SignalAt(keras.layers.Layer):
  """The identity; on its `call_number`-th training call (counted at run
  time, also inside graphs) it sends `signal_number` to this process, once
  while `armed.on`."""

  def __init__(self, call_number, signal_number, armed, **kwargs):
    super().__init__(**kwargs)
    self.call_number, self.signal_number = call_number, signal_number
    self.armed, self.calls = armed, 0

  def _count(self):
    self.calls += 1
    if self.armed.on and self.calls == self.call_number:
      self.armed.on = False
      os.kill(os.getpid(), self.signal_number)
    return np.float32(0.0)

  def call(self, inputs, training=None):
    if not training:
      return inputs
    zero = tf.py_function(self._count, [], tf.float32)
    return inputs + tf.ensure_shape(zero, [])
