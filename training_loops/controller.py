"""`Controller`: one training run's outer loop, the same for every loop.

As Orbit's `Controller`, it owns what happens around the steps, each in
one place: the callback list, checkpoints (restore, one save per epoch and
per `Cadence` step, the position of a stop), stop requests, the `History`,
the progress bar, validation (per epoch and per `Cadence` step), and the
translation of TensorFlow's errors into ours. A driver
(`drivers`) only runs steps: the controller asks a custom loop's
`stepper` for up to so many steps and gets their logs back, as Orbit's
controller asks its trainer; `model.fit`, which runs its own epochs,
reaches the same hooks through its callbacks.
"""

import dataclasses
import time

from absl import logging
import keras
import tensorflow as tf

from training_loops.callback_state import CallbackState
from training_loops.callbacks import EpochRecorder
from training_loops.checkpoints import RunCheckpoint, replay_data_order
from training_loops.drivers import StepDriver
from training_loops.history import History
from training_loops.interrupts import StopRequests, TrainingInterrupted
from training_loops.strategies import (PEER_FAILURES,
                                       CollectiveMismatchError,
                                       WorkerLostError,
                                       collectives_mismatched,
                                       fit_builds_symbolically,
                                       is_multi_worker)
from training_loops.step import first_non_finite
from training_loops.supervised_step import (NonFiniteLossError,
                                            TrainingDataError)


@dataclasses.dataclass
class Epoch:
  """Where the controller is in one epoch of a custom loop.

  Attributes:
    index: the epoch, 0-based.
    iterator: its distributed batches, past those a resumed run trained.
    steps: steps done in it, counting those of a resumed run.
    hooks: `BatchHooks` to run around each driver call.
    progress_bar: the epoch's `keras.utils.Progbar`, finalized at its end.
    last_logs: the logs of its last step (None before the first).
  """
  index: int
  iterator: object
  steps: int
  hooks: object
  progress_bar: object = None
  last_logs: dict | None = None


class Cadence:
  """Validation and checkpoints every so many training steps, counted over
  the run (`steps_done`, saved in checkpoints).

  An event due at an epoch's last step is left to the epoch's end, which
  validates and checkpoints anyway (when the data's length is known: else
  the last step is only known as such once a call finds the data ended).
  """

  def __init__(self, eval_every_steps=None, checkpoint_every_steps=None):
    for name, value in (("eval_every_steps", eval_every_steps),
                        ("checkpoint_every_steps", checkpoint_every_steps)):
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got "
                         f"{value!r}.")
    self.eval_every_steps = eval_every_steps
    self.checkpoint_every_steps = checkpoint_every_steps
    self.steps_done = 0

  @property
  def active(self):
    return bool(self.eval_every_steps or self.checkpoint_every_steps)

  def steps_before_event(self, steps_per_call):
    if not self.active:  # asked before every call: the common case first
      return steps_per_call
    return min([steps_per_call] + [
        every - self.steps_done % every
        for every in (self.eval_every_steps, self.checkpoint_every_steps)
        if every])

  def eval_due(self, steps):
    """Whether the last `steps` steps crossed a validation step."""
    return _crossed(self.eval_every_steps, self.steps_done, steps)

  def checkpoint_due(self, steps):
    return _crossed(self.checkpoint_every_steps, self.steps_done, steps)


def _crossed(every, steps_done, steps):
  return bool(every) and steps_done // every > (steps_done - steps) // every


class BatchHooks:
  """Keras' batch-level callbacks around each driver call, as `model.fit`
  calls them with `steps_per_execution`: `begin` with the index of the
  call's first batch, `end` with its last and the running logs.

  Keras marks the empty hooks of its `Callback` as defaults; when no
  callback has any other (a subclass's method, or `LambdaCallback`'s), nothing
  is called and no logs are read: a run without batch-level callbacks pays
  nothing per step. (Fit calls them, and reads the logs, at every
  execution; `ModelCheckpoint` and `BackupAndRestore` always have one.)
  """

  _NAMES = {"train": ("on_train_batch_begin", "on_train_batch_end",
                      "on_batch_begin", "on_batch_end"),
            "test": ("on_test_batch_begin", "on_test_batch_end")}

  def __init__(self, kind, callback_list, logs, batches=None,
               progress=None):
    """`logs(last_logs)`: the running results, given the last step's logs;
    `batches`: how many the data has, if known (fit never begins a batch
    past the end); `progress(done, logs)`, the progress bar's update, runs
    at every `end`."""
    self.active = any(
        not getattr(getattr(callback, name), "_is_default", False)
        for callback in callback_list.callbacks
        for name in self._NAMES[kind])
    self._begin = getattr(callback_list, f"on_{kind}_batch_begin")
    self._end = getattr(callback_list, f"on_{kind}_batch_end")
    self._logs, self._batches, self._progress = logs, batches, progress

  def begin(self, done):
    if self.active and (self._batches is None or done < self._batches):
      self._begin(done)

  def end(self, done, last_logs):
    if not (self.active or self._progress):
      return
    logs = as_floats(self._logs(last_logs))
    if self._progress:
      self._progress(done, logs)
    if self.active:
      self._end(done - 1, logs)


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """What a run does around its steps, as `train` was asked; the options
  are checked here, together.

  Attributes:
    epochs: the total number of epochs, counting those a resumed run did.
    validation_data: a `tf.data.Dataset` of batches, or None.
    checkpoint_dir: save every epoch there (and every
      `checkpoint_every_steps`, and the position of a stop); if it holds a
      checkpoint, resume from it.
    log_dir: TensorBoard event files in `log_dir/train` and
      `log_dir/validation`.
    callbacks: `keras.callbacks.Callback`s.
    verbose: 0 silent, 1 a progress bar, 2 one line per epoch.
    eval_every_steps, checkpoint_every_steps: the `Cadence` of
      step-counted validation and checkpoints.
  """
  epochs: int = 1
  validation_data: object = None
  checkpoint_dir: object = None
  log_dir: object = None
  callbacks: tuple = ()
  verbose: int = 1
  eval_every_steps: int | None = None
  checkpoint_every_steps: int | None = None

  def __post_init__(self):
    if not isinstance(self.epochs, int) or self.epochs < 1:
      raise ValueError(f"epochs must be a positive int, got "
                       f"{self.epochs!r}.")
    Cadence(self.eval_every_steps, self.checkpoint_every_steps)  # checks
    if self.eval_every_steps and self.validation_data is None:
      raise ValueError("eval_every_steps needs validation_data.")
    if self.checkpoint_every_steps and self.checkpoint_dir is None:
      raise ValueError("checkpoint_every_steps needs a checkpoint_dir.")


class Controller:
  """Runs `driver` on `train_data` as `options` say, with Keras' callback
  order.

  Args:
    driver: a `drivers.Driver` around the run's `step.TrainingStep`.
    train_data: a `tf.data.Dataset` of batches.
    options: `RunOptions`.
  """

  def __init__(self, driver, train_data, options=RunOptions()):
    trainer = driver.trainer
    self.driver, self.trainer, self.model = driver, trainer, trainer.model
    self.train_data = train_data
    self.validation_data = options.validation_data
    checkpoint_dir, log_dir = options.checkpoint_dir, options.log_dir
    callbacks = options.callbacks
    self.train_length = known_length(train_data)
    self.epochs_total, self.verbose = options.epochs, options.verbose
    self.cadence = Cadence(options.eval_every_steps,
                           options.checkpoint_every_steps)
    self.history = History(model=self.model)
    self.recorder = EpochRecorder(
        self.history, trainer.optimizers(),
        lambda: self.cadence.steps_done, log_dir)
    self.callbacks = [self.recorder, *callbacks]
    self.callback_state = (CallbackState(self.callbacks, self.model)
                           if checkpoint_dir else None)
    self.checkpoint = (
        RunCheckpoint(checkpoint_dir, self.model,
                      trainer.checkpoint_objects(), trainer.strategy,
                      self.history, trainer.progress_variables(),
                      callback_state=self.callback_state)
        if checkpoint_dir else None)
    # (epoch, steps done in it): where the run is, and where a stop saves.
    self.position = (0, 0)
    self._saved_position = None  # what the checkpoint holds
    self._distributed_validation = None
    self._epoch_end_is_a_step_validation = False
    self._stops = None

  def run(self):
    """Resumes from the checkpoint, if any, and trains; returns the
    `History`.

    Raises:
      NonFiniteLossError: the training loss became NaN or infinite.
      TrainingDataError: a step rejected a batch.
      WorkerLostError: a multi-worker peer stopped responding.
      TrainingInterrupted: SIGINT or SIGTERM; the position was saved, with
        a `checkpoint_dir`.
    """
    restored = False
    with StopRequests() as self._stops:
      try:
        self._restore()  # a collective in a multi-worker run
        restored = True
        if isinstance(self.driver, StepDriver):
          for epoch in self.epochs():
            self._train_epoch(epoch)
        else:  # a loop that runs its own epochs calls the hooks below
          self.driver.run(self)
      except tf.errors.InvalidArgumentError as error:
        if collectives_mismatched(error):
          raise CollectiveMismatchError(self.position[0], error) from error
        if not restored:
          raise
        raise TrainingDataError(self.position[0], error) from error
      except PEER_FAILURES as error:
        if not is_multi_worker(self.trainer.strategy):
          raise  # no peers: a failure of its own
        raise WorkerLostError(self.position[0] if restored else None,
                              error) from error
      if self._stops.requested:
        self._interrupt()
    return self.history

  def _restore(self):
    if self.checkpoint:
      epochs_done, steps_in_epoch, self.cadence.steps_done = (
          self.checkpoint.restore())
      self.position = self._saved_position = (epochs_done, steps_in_epoch)
      if self.position != (0, 0):
        self.history.resumed_from = {"epoch": epochs_done,
                                     "step": steps_in_epoch}
    # Under a strategy other than the default, fit opens the training data
    # once before its first epoch, which moves a reshuffling dataset on by
    # one order: every loop does, so that each epoch sees fit's order.
    looked = int(fit_builds_symbolically(self.model, self.trainer.strategy)
                 and not self.driver.opens_data_before_training)
    replay_data_order(self.train_data, self.position[0] + looked)

  @property
  def stop_requested(self):
    return self._stops.requested

  @property
  def stopped_by_callback(self):
    """Whether the checkpoint resumed was saved after a callback had stopped
    the run: then it trains no further."""
    return self.callback_state is not None and self.callback_state.stopped

  # -- for the custom loops ------------------------------------------------

  def epochs(self):
    """Yields an `Epoch` for each epoch to train (`_train_epoch`), in
    fit's callback order:
    `on_train_begin` (then the callbacks' state a checkpoint restored, and
    the epoch `BackupAndRestore` restored, if any);
    per epoch the metrics' reset, `on_epoch_begin`, the driver's calls with
    their batch hooks, validation (the driver's `evaluate`, with test-batch
    hooks), `on_epoch_end` and the checkpoint; at the end the optimizer's
    EMA finalization and `on_train_end`. Ends early when a callback sets
    `model.stop_training` or a stop is requested (at a step boundary); a
    resumed run that a callback had stopped runs no epoch."""
    strategy = self.trainer.strategy
    train_batches = strategy.experimental_distribute_dataset(self.train_data)
    train_length = self.train_length
    # The params fit gives its callbacks (SwapEMAWeights reads "epochs").
    callbacks = keras.callbacks.CallbackList(
        self.callbacks, model=self.model, verbose=self.verbose,
        epochs=self.epochs_total, steps=train_length)
    test_hooks = BatchHooks(
        "test", callbacks,
        lambda last_logs: self.trainer.eval_logs(last_logs, prefix=""),
        known_length(self.validation_data))
    self.model.stop_training = False
    callbacks.on_train_begin()
    self.train_begun()
    restored = getattr(self.model, "_initial_epoch", None)
    if restored:  # by `keras.callbacks.BackupAndRestore`; fit starts there
      if self.checkpoint and self.position != (restored, 0):
        raise ValueError(
            f"BackupAndRestore restored epoch {restored}, but "
            f"{self.checkpoint.directory} holds epoch {self.position[0]}, "
            f"step {self.position[1]}: resume from one of them.")
      self.position = (restored, 0)
    first_epoch, first_step = self.position
    last_epoch = first_epoch if self.stopped_by_callback else self.epochs_total
    logs = None
    for index in range(first_epoch, last_epoch):
      if self.verbose:
        print(f"Epoch {index + 1}/{self.epochs_total}")
      first = first_step if index == first_epoch else 0
      epoch = self._begin_epoch(index, first, train_batches, train_length,
                                callbacks)
      callbacks.on_epoch_begin(index)  # after the metrics' reset, as fit
      yield epoch
      self.position = (index, epoch.steps)
      if self.stop_requested:
        return
      if epoch.steps == 0:  # a dataset of unknown length that was empty
        raise ValueError("train_data yielded no batches.")
      logs = self.trainer.train_logs(epoch.last_logs)
      if self.validation_data is not None:
        callbacks.on_test_begin()
        last_logs = self.driver.evaluate(iter(self._validation_batches()),
                                         test_hooks)
        validation_logs = as_floats(
            self.trainer.eval_logs(last_logs, prefix=""))
        callbacks.on_test_end(validation_logs)
        logs.update({f"val_{key}": value
                     for key, value in validation_logs.items()})
      logs = as_floats(logs)
      epoch.progress_bar.update(epoch.steps, logs.items(), finalize=True)
      callbacks.on_epoch_end(index, logs)
      self.epoch_done(index, logs)
      if self.model.stop_training:
        break
    self.trainer.finish()
    callbacks.on_train_end(logs)

  def _begin_epoch(self, index, first_step, train_batches, batches,
                   callbacks):
    if not first_step:
      self.trainer.reset()  # else: the running metrics were restored
    # Every log is shown as it is, not averaged again, as fit's progress
    # bar shows them.
    progress_bar = keras.utils.Progbar(batches, verbose=self.verbose,
                                       stateless_metrics=set())
    hooks = BatchHooks(
        "train", callbacks, self.trainer.train_logs, batches,
        (lambda done, logs: progress_bar.update(done, logs.items()))
        if self.verbose == 1 else None)
    iterator = iter(train_batches)
    for _ in range(first_step):  # batches trained before the stop
      next(iterator)
    self.position = (index, first_step)
    return Epoch(index, iterator, first_step, hooks, progress_bar)

  def _train_epoch(self, epoch):
    """Has the driver train on `epoch.iterator` until the data ends, a
    stop is requested (checked before each call) or a callback sets
    `model.stop_training` (after each, as fit checks it after each
    execution). Each call runs up to the driver's `steps_per_call` steps,
    fewer where a step-cadence validation or checkpoint is due; its steps'
    losses are checked, the batch hooks run around it, and what falls due
    after it is done."""
    steps_per_call = self.driver.steps_per_call
    run_steps = self.driver.stepper(epoch.iterator)
    while not self.stop_requested:
      limit = self.cadence.steps_before_event(steps_per_call)
      epoch.hooks.begin(epoch.steps)
      steps, logs = run_steps(limit)
      if steps:
        _check_finite(logs, epoch.index, epoch.steps + steps)
        epoch.steps += steps
        epoch.last_logs = logs
        epoch.hooks.end(epoch.steps, logs)
        self.steps_ran(steps, epoch.index, epoch.steps)
      if steps < limit or self.model.stop_training:
        return

  # -- for every loop ------------------------------------------------------

  def train_begun(self):
    """After the callbacks' `on_train_begin`, which resets early stopping:
    gives them back the state the checkpoint restored and, if one of them
    had stopped the run, sets `model.stop_training` again (reports read
    it)."""
    if self.callback_state is None:
      return
    self.callback_state.apply()
    if self.stopped_by_callback:
      logging.warning(
          "%s holds a run a callback stopped: it trains no further (a new "
          "checkpoint directory starts over).", self.checkpoint.directory)
      self.model.stop_training = True

  def epoch_begun(self, index):
    """Notes that epoch `index` started (for a loop that runs its own
    epochs), so errors and stops name it."""
    self.position = (index, 0)

  def steps_ran(self, steps, epoch, steps_in_epoch):
    """Counts `steps` more training steps, `steps_in_epoch` done in epoch
    `epoch`, and validates or checkpoints if the cadence says so; at the
    epoch's last step its end does both, and only notes a validation due
    (a `model.fit` execution can cross one before the end)."""
    cadence = self.cadence
    cadence.steps_done += steps
    self.history.steps_trained += steps
    self.position = (epoch, steps_in_epoch)
    eval_due = cadence.eval_due(steps)
    if steps_in_epoch == self.train_length:
      self._epoch_end_is_a_step_validation = eval_due
      return
    if eval_due:
      self._validate_between_epochs(epoch)
    if cadence.checkpoint_due(steps) and self.checkpoint:
      self._save(epoch, steps_in_epoch)

  def _validate_between_epochs(self, epoch):
    """Validation at a step, logged by step; Keras has no callback event
    for it, so none is called."""
    started = time.perf_counter()
    kept = self.trainer.kept_across_validation()
    values = [variable.numpy() for variable in kept]
    last_logs = self.driver.evaluate(iter(self._validation_batches()))
    logs = as_floats(self.trainer.eval_logs(last_logs))
    for variable, value in zip(kept, values):
      variable.assign(value)
    self.recorder.step_validated(
        self.cadence.steps_done, epoch, logs,
        seconds=time.perf_counter() - started)

  def _validation_batches(self):
    if self._distributed_validation is None:
      self._distributed_validation = (
          self.trainer.strategy.experimental_distribute_dataset(
              self.validation_data))
    return self._distributed_validation

  def epoch_done(self, index, logs):
    """After epoch `index` and its callbacks, with its `logs`: records the
    epoch's validation as the step's when one is due there, saves the
    checkpoint and, on a stop request, asks the loop to stop."""
    if self._epoch_end_validates_a_step():
      self.recorder.step_validated(
          self.cadence.steps_done, index,
          {key: value for key, value in logs.items()
           if key.startswith("val_")})
    self._epoch_end_is_a_step_validation = False
    if self.checkpoint:
      self._save(index + 1, 0)
    self.position = (index + 1, 0)
    if self.stop_requested:
      self.model.stop_training = True

  def _epoch_end_validates_a_step(self):
    every, steps_done = self.cadence.eval_every_steps, self.cadence.steps_done
    recorded = self.history.step_history.get("step", [])
    if not every or recorded[-1:] == [steps_done]:  # validated mid-epoch
      return False
    # The modulo also catches a resumed epoch that a stop ended at its last
    # step, before its validation.
    return self._epoch_end_is_a_step_validation or steps_done % every == 0

  def _save(self, epoch, step):
    self.checkpoint.save(epoch, step, self.cadence.steps_done)
    self._saved_position = (epoch, step)

  def _interrupt(self):
    epoch, step = self.position
    if self.checkpoint and self.position != self._saved_position:
      self._save(epoch, step)
    raise TrainingInterrupted(self._stops.signal_number, epoch, step,
                              self.history,
                              saved=self.checkpoint is not None)


def _check_finite(logs, epoch, step):
  non_finite = first_non_finite(logs)
  if non_finite:
    name, value = non_finite
    raise NonFiniteLossError(epoch, step, value,
                             None if name == "loss" else name)


def as_floats(logs):
  return {key: float(value) for key, value in logs.items()}


def known_length(dataset):
  """The number of batches of `dataset`, or None if unknown."""
  cardinality = int(dataset.cardinality()) if dataset is not None else -1
  return cardinality if cardinality > 0 else None
