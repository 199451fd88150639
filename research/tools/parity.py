"""Keras features in every loop against `model.fit`: the parity table.

    python -m research parity

Each feature (a Keras callback, an optimizer option, a dtype policy) trains
the same small classifier, built from this project's layers and losses, in
every loop on the same data and seed with op determinism on (the graph
loop one step a call, as fit's default), and reports per loop the largest
difference of its final weights from `model.fit`'s and what the feature
itself shows (the final learning rate, the loss scale, the batch-hook
calls, the CSV rows): "ok" when the weights are within the feature's
tolerance (1e-4; 2e-2 under float16 and bfloat16) and it shows what fit
shows.
"""

import dataclasses
import os
import tempfile
from typing import Callable

from absl import app, flags
import keras
import numpy as np
import tensorflow as tf

import layers
import losses
import training_loops

flags.DEFINE_integer("parity_examples", 512, "Training examples.",
                     lower_bound=2)
flags.DEFINE_integer("parity_batch_size", 64, "Batch size.", lower_bound=1)
flags.DEFINE_integer("parity_epochs", 3, "Epochs per run.", lower_bound=1)

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Feature:
  """One row: how to train with the feature, and what to show of a run."""
  name: str
  callbacks: Callable = lambda directory: []
  optimizer_fn: Callable = lambda: keras.optimizers.SGD(0.1)
  policy: str = "float32"
  tolerance: float = 1e-4
  shows: Callable = lambda run: ""


@dataclasses.dataclass(frozen=True)
class Run:
  """One feature trained in one loop."""
  history: training_loops.History
  directory: str
  callbacks: list


class _BatchEndCounter(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.calls = 0

  def on_train_batch_end(self, batch, logs=None):
    self.calls += 1


def _learning_rate(run):
  rate = run.history.model.optimizer.learning_rate
  return f"lr {float(np.asarray(rate)):.4g}"


def _batch_end_calls(run):
  return f"{run.callbacks[0].calls} batch-end calls"


def _csv_rows(run):
  with open(os.path.join(run.directory, "log.csv"),
            encoding="utf-8") as stream:
    return f"{len(stream.readlines()) - 1} CSV rows"


def _loss_scale(run):
  scale = run.history.model.optimizer.dynamic_scale
  return f"loss scale {float(np.asarray(scale)):g}"


FEATURES = (
    Feature("LearningRateScheduler", lambda d: [
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5)],
            shows=_learning_rate),
    Feature("ReduceLROnPlateau", lambda d: [
        keras.callbacks.ReduceLROnPlateau("loss", factor=0.5, patience=0,
                                          min_delta=10.0)],
            shows=_learning_rate),
    Feature("mixed_float16 + LossScaleOptimizer(SGD(0.1))",
            optimizer_fn=lambda: keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(0.1)),
            policy="mixed_float16", tolerance=2e-2, shows=_loss_scale),
    Feature("mixed_bfloat16", policy="mixed_bfloat16", tolerance=2e-2),
    Feature("SGD(use_ema=True) + SwapEMAWeights", lambda d: [
        keras.callbacks.SwapEMAWeights(swap_on_epoch=True)],
            optimizer_fn=lambda: keras.optimizers.SGD(0.1, use_ema=True)),
    Feature("on_train_batch_end", lambda d: [_BatchEndCounter()],
            shows=_batch_end_calls),
    Feature("CSVLogger", lambda d: [
        keras.callbacks.CSVLogger(os.path.join(d, "log.csv"))],
            shows=_csv_rows),
    Feature("gradient_accumulation_steps=2", optimizer_fn=lambda:
            keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)),
    Feature("global_clipnorm=0.05, one replica", optimizer_fn=lambda:
            keras.optimizers.SGD(0.1, global_clipnorm=0.05)),
    Feature("clipvalue=0.01, one replica", optimizer_fn=lambda:
            keras.optimizers.SGD(0.1, clipvalue=0.01)),
    Feature("weight_decay=0.01", optimizer_fn=lambda:
            keras.optimizers.SGD(0.1, weight_decay=0.01)),
    Feature("loss_scale_factor=128", optimizer_fn=lambda:
            keras.optimizers.SGD(0.1, loss_scale_factor=128.0)),
    Feature("use_ema, ema_overwrite_frequency=2", optimizer_fn=lambda:
            keras.optimizers.SGD(0.1, use_ema=True,
                                 ema_overwrite_frequency=2)),
)


def _data(examples, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(examples, 8)).astype("float32")
  y = ((x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1)).clip(0, 2)
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def _model():
  return keras.Sequential([
      keras.Input((8,)), layers.Dense(16, "relu"),
      layers.BatchNormalization(), layers.Dense(3, "softmax")])


def run_feature(feature, loop, examples, batch_size, epochs):
  """Trains with `feature` in `loop`; returns the `Run`."""
  directory = tempfile.mkdtemp(prefix="parity_")
  callbacks = feature.callbacks(directory)
  keras.mixed_precision.set_dtype_policy(feature.policy)
  try:
    history = training_loops.train(
        _model, feature.optimizer_fn, losses.SparseCategoricalCrossentropy(),
        _data(examples, batch_size), loop=loop, epochs=epochs,
        # One step a call, as fit's default, so batch-level hooks compare.
        steps_per_loop=1 if loop == "graph" else None,
        validation_data=_data(batch_size * 2, batch_size, seed=1),
        callbacks=callbacks, seed=0, verbose=0)
  finally:
    keras.mixed_precision.set_dtype_policy("float32")
  return Run(history, directory, callbacks)


def max_weight_difference(history, reference):
  return max(float(np.max(np.abs(np.asarray(w, np.float64) - r)))
             for w, r in zip(history.model.get_weights(),
                             reference.model.get_weights()))


def parity_rows(features=FEATURES, loops=training_loops.LOOPS, examples=512,
                batch_size=64, epochs=3):
  """`[(feature, {loop: cell})]`, each cell "max |w - w_fit|, what the
  feature shows, ok / DIFFERS"."""
  rows = []
  for feature in features:
    fit = run_feature(feature, "keras_fit", examples, batch_size, epochs)
    cells = {"keras_fit": feature.shows(fit) or "reference"}
    for loop in loops:
      if loop == "keras_fit":
        continue
      run = run_feature(feature, loop, examples, batch_size, epochs)
      difference = max_weight_difference(run.history, fit.history)
      shown = feature.shows(run)
      same = difference <= feature.tolerance and shown == feature.shows(fit)
      verdict = "ok" if same else "DIFFERS"
      cells[loop] = ", ".join(part for part in (
          f"{difference:.1e}", shown, verdict) if part)
    rows.append((feature.name, cells))
  return rows


def format_table(rows, loops=training_loops.LOOPS):
  header = ["feature", *loops]
  lines = ["| " + " | ".join(header) + " |",
           "| " + " | ".join("---" for _ in header) + " |"]
  for name, cells in rows:
    lines.append("| " + " | ".join([name] + [cells.get(loop, "")
                                             for loop in loops]) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  tf.config.experimental.enable_op_determinism()
  tf.get_logger().setLevel("ERROR")  # each run traces its loop's functions
  print(format_table(parity_rows(
      examples=FLAGS.parity_examples, batch_size=FLAGS.parity_batch_size,
      epochs=FLAGS.parity_epochs)))


if __name__ == "__main__":
  app.run(main)
