"""Callbacks with Keras' `on_epoch_end(epoch, logs)` contract.

They subclass `keras.callbacks.Callback`, so they work in `model.fit` as
well as in the custom loops, and Keras' own callbacks work in both.
"""

import contextlib
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from training_loops.atomic import make_directory, replaced_atomically, writing


class EarlyStopping(keras.callbacks.Callback):
  """Stops training when `monitor` has not improved for `patience` epochs.

  Args:
    monitor: a key of the epoch logs, e.g. `"val_loss"`.
    patience: epochs without improvement before stopping.
    min_delta: the smallest change that counts as an improvement.
    mode: `"min"`, `"max"`, or `"auto"` (max for accuracy-like names).
    restore_best_weights: on stopping, put back the best epoch's weights.
  Attributes:
    stopped_epoch: the epoch at which training stopped, or None.
    best_epoch, best: where and what the best value was.
  """

  def __init__(self, monitor="val_loss", patience=0, min_delta=0.0,
               mode="auto", restore_best_weights=False):
    super().__init__()
    self.monitor = monitor
    self.patience = patience
    self.min_delta = abs(min_delta)
    self.sign = _improvement_sign(monitor, mode)
    self.restore_best_weights = restore_best_weights

  def on_train_begin(self, logs=None):
    self.best, self.best_epoch, self.best_weights = math.inf, None, None
    self.wait, self.stopped_epoch = 0, None

  def on_epoch_end(self, epoch, logs=None):
    current = _monitored(self.monitor, logs)
    if self.sign * current < self.best - self.min_delta:
      self.best, self.best_epoch, self.wait = self.sign * current, epoch, 0
      if self.restore_best_weights:
        self.best_weights = self.model.get_weights()
      return
    self.wait += 1
    if self.wait >= self.patience and epoch > 0:
      self.stopped_epoch = epoch
      self.model.stop_training = True
      if self.restore_best_weights and self.best_weights is not None:
        self.model.set_weights(self.best_weights)


class BestModelCheckpoint(keras.callbacks.Callback):
  """Saves the model's weights whenever `monitor` improves.

  The file (`*.weights.h5`) is replaced atomically, so a crash mid-write
  leaves the previous best readable.
  """

  def __init__(self, filepath, monitor="val_loss", mode="auto"):
    super().__init__()
    if not str(filepath).endswith(".weights.h5"):
      raise ValueError(f"BestModelCheckpoint: filepath must end in "
                       f".weights.h5, got {filepath!r}.")
    self.filepath = os.fspath(filepath)
    self.monitor = monitor
    self.sign = _improvement_sign(monitor, mode)
    self.best, self.best_epoch = math.inf, None

  def on_epoch_end(self, epoch, logs=None):
    current = self.sign * _monitored(self.monitor, logs)
    if current < self.best:
      self.best, self.best_epoch = current, epoch
      with replaced_atomically(self.filepath) as temporary:
        self.model.save_weights(temporary)


class ProfileEpoch(keras.callbacks.Callback):
  """Traces one epoch's training with the TensorFlow profiler.

  The trace (`log_dir/plugins/profile/<run>/*.xplane.pb`) opens in
  TensorBoard's Profile tab (the `tensorboard-plugin-profile` package). It
  works in every loop: Keras' `TensorBoard(profile_batch=...)` counts
  batches, which the custom loops do not report one by one. The trace ends
  before validation, so it holds training only; the default epoch, 1, skips
  the first epoch's tracing and compilation. A run that raises mid-epoch
  leaves the profiler on: `tf.profiler.experimental.stop()` ends it.
  """

  def __init__(self, log_dir, epoch=1):
    super().__init__()
    self.log_dir = os.fspath(log_dir)
    self.epoch = epoch
    self._tracing = False

  def on_epoch_begin(self, epoch, logs=None):
    if epoch == self.epoch:
      tf.profiler.experimental.start(self.log_dir)
      self._tracing = True

  def on_test_begin(self, logs=None):
    self._stop()

  def on_epoch_end(self, epoch, logs=None):
    self._stop()

  def _stop(self):
    if self._tracing:
      tf.profiler.experimental.stop()
      self._tracing = False


class EpochRecorder(keras.callbacks.Callback):
  """Fills a `History` and writes TensorBoard summaries, for every loop.

  Steps are the training steps the run counted (`steps_done()`, over the
  run), so `model.fit` and the custom loops are timed the same way, and a
  step that applies two optimizers, or one several times, is one step.
  The history also gets each optimizer's learning rate at each epoch's end
  (`learning_rate` for one optimizer, `<name>_learning_rate` for several).
  Summaries use the tags of
  Keras' TensorBoard callback (`epoch_loss`, `epoch_<metric>` in `train/`
  and `validation/`; `evaluation_<metric>_vs_iterations` in `validation/`
  for validations by step) plus `epoch_learning_rate` and
  `epoch_steps_per_second`. A summary that cannot be written (a full
  disk, a denied permission) raises a `WriteError` naming its directory,
  as every other write of a run does, where TensorFlow's writer would
  raise from inside a flush.
  """

  def __init__(self, history, optimizers, steps_done, log_dir=None):
    super().__init__()
    self.history = history
    self.optimizers = optimizers
    self.steps_done = steps_done
    self.log_dir = log_dir
    self._writers = None

  def on_train_begin(self, logs=None):
    if self.log_dir and self._writers is None:
      self._writers = {}
      for split in ("train", "validation"):
        with self._writing(split):
          make_directory(self._directory(split))
          self._writers[split] = tf.summary.create_file_writer(
              self._directory(split))

  def on_epoch_begin(self, epoch, logs=None):
    self._start = self._train_end = time.perf_counter()
    self._start_step = self.steps_done()
    self._validating = False
    self._step_validation_seconds = 0.0

  def step_validated(self, step, epoch, logs, seconds=0.0):
    """Records a validation at training step `step` (of the run), which
    took `seconds` of the epoch's training time."""
    self.history.append_step(step, epoch, logs)
    self._step_validation_seconds += seconds
    if self._writers:
      with self._writing("validation", step=step):
        for key, value in logs.items():
          tf.summary.scalar(
              f"evaluation_{key[len('val_'):]}_vs_iterations", value)

  def on_test_begin(self, logs=None):
    self._train_end, self._validating = time.perf_counter(), True

  def on_epoch_end(self, epoch, logs=None):
    end = time.perf_counter()
    train_seconds = (self._train_end if self._validating else end) - (
        self._start) - self._step_validation_seconds
    steps = self.steps_done() - self._start_step
    steps_per_second = steps / train_seconds if train_seconds > 0 else 0.0
    logs = {key: float(value) for key, value in (logs or {}).items()}
    for name, optimizer in self.optimizers.items():
      key = ("learning_rate" if len(self.optimizers) == 1
             else f"{name}_learning_rate")
      logs[key] = float(np.asarray(optimizer.learning_rate))
    self.history.append(epoch, logs, steps_per_second, end - self._start)
    if self._writers:
      self._write_summaries(epoch, logs, steps_per_second)

  def on_train_end(self, logs=None):
    for split, writer in (self._writers or {}).items():
      with self._writing(split):
        writer.flush()

  def _directory(self, split):
    return os.path.join(self.log_dir, split)

  @contextlib.contextmanager
  def _writing(self, split, step=None):
    """Writes `split`'s summaries (at `step`, if given): a failed write
    raises a `WriteError` naming the split's directory."""
    with writing(self._directory(split)):
      if step is None:
        yield
      else:
        with self._writers[split].as_default(step=step):
          yield

  def _write_summaries(self, epoch, logs, steps_per_second):
    train = {key: value for key, value in logs.items()
             if not key.startswith("val_")}
    train["steps_per_second"] = steps_per_second
    validation = {key[len("val_"):]: value for key, value in logs.items()
                  if key.startswith("val_")}
    for split, values in (("train", train), ("validation", validation)):
      with self._writing(split, step=epoch):
        for key, value in values.items():
          tf.summary.scalar("epoch_" + key, value)


def _improvement_sign(monitor, mode):
  """+1 when smaller is better, -1 when larger is."""
  if mode not in ("auto", "min", "max"):
    raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}.")
  if mode == "auto":
    larger_is_better = any(word in monitor for word in ("acc", "auc",
                                                        "precision",
                                                        "recall"))
    return -1 if larger_is_better else 1
  return 1 if mode == "min" else -1


def _monitored(monitor, logs):
  if not logs or monitor not in logs:
    raise KeyError(f"Callback monitors {monitor!r}, which is not among the "
                   f"epoch results {sorted(logs or {})}.")
  return float(logs[monitor])
