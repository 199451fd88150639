"""The `model.fit` baseline behind the driver protocol.

`model.fit` runs its own epochs, so this driver hands it the controller's
callbacks between `_CountSteps`, which counts the epoch's steps into the
controller, and `_ControllerHooks`, which brings the controller's epoch
bookkeeping (checkpoint, stop requests) into fit's callback order.
"""

import keras

from training_loops import drivers
from training_loops.controller import known_length
from training_loops.keras_step import KerasStep
from training_loops.step import first_non_finite
from training_loops.supervised_step import NonFiniteLossError, Trainer


@drivers.register("keras_fit")
class KerasFitDriver(drivers.Driver):
  """`model.fit` on the model `train` compiled, or on a model with its own
  `train_step` (`steps_per_loop` becomes `steps_per_execution`), with
  `jit_compile` as asked.

  Fit validates at epoch ends itself; the controller's validations by step
  run the graph loop's eval step on the same model (`evaluate`), into the
  trainer's eval metrics, which fit's compiled metrics never see.
  """

  resumes_mid_epoch = False
  # Keras' symbolic build draws a batch before the first epoch when the
  # model was built under a strategy's scope.
  opens_data_before_training = True

  def __init__(self, trainer, options=drivers.LoopOptions()):
    super().__init__(trainer, options)
    if not isinstance(trainer, (Trainer, KerasStep)):
      raise ValueError(
          f"keras_fit runs a keras.Model's train_step; "
          f"{type(trainer).__name__} is a TrainingStep of its own: train it "
          f"with loop='eager', 'function' or 'graph', or write its step as "
          f"the train_step of a keras.Model subclass.")
    self._evaluator = None

  def evaluate(self, iterator, hooks=None):
    if self._evaluator is None:
      self._evaluator = drivers.GraphDriver(self.trainer)
    return self._evaluator.evaluate(iterator, hooks)

  def run(self, controller):
    """Trains the epochs `controller` asks for under `model.fit`, bringing
    the controller's hooks into fit's callbacks."""
    first_epoch, first_step = controller.position
    if first_step:
      raise ValueError(f"{controller.checkpoint.directory} was saved "
                       "mid-epoch by a custom loop; resume it with that "
                       "loop.")
    trainer = self.trainer
    # Explicitly: Keras' "auto" turns XLA off on CPU-only machines.
    trainer.model.jit_compile = self.options.jit_compile
    trainer.model.steps_per_execution = self.options.steps_per_loop or 1
    # Fit resets its compiled metrics only once they are built, after the
    # first batch: a running state restored from the checkpoint would
    # otherwise leak into the first resumed epoch.
    trainer.reset()
    # With steps_per_epoch given, fit opens one dataset iterator per epoch,
    # as the custom loops do (without it, two: one is opened and dropped at
    # each epoch's end), so `replay_data_order` resumes shuffled data alike.
    # A run a callback had stopped runs no epoch, but fit still calls
    # `on_train_end`, where Keras' `EarlyStopping` restores the best weights.
    by_step = controller.cadence.active or controller.train_length is None
    trainer.model.fit(
        controller.train_data,
        epochs=(first_epoch if controller.stopped_by_callback
                else controller.epochs_total),
        initial_epoch=first_epoch,
        steps_per_epoch=known_length(controller.train_data),
        validation_data=controller.validation_data,
        callbacks=[(_CountStepsByExecution if by_step else _CountSteps)(
                       controller),
                   *controller.callbacks, _ControllerHooks(controller)],
        shuffle=False, verbose=controller.verbose)


class _CountSteps(keras.callbacks.Callback):
  """First in fit's callbacks: counts an epoch's steps into the controller
  at its end, before the others (the history's steps per second) read
  them."""

  def __init__(self, controller):
    super().__init__()
    self.controller = controller

  def on_epoch_begin(self, epoch, logs=None):
    self.controller.epoch_begun(epoch)
    self._epoch, self._steps_in_epoch = epoch, 0

  def on_epoch_end(self, epoch, logs=None):
    if not self._steps_in_epoch:  # not counted execution by execution
      self._count(self.controller.train_length)

  def _count(self, steps_in_epoch):
    self.controller.steps_ran(steps_in_epoch - self._steps_in_epoch,
                              self._epoch, steps_in_epoch)
    self._steps_in_epoch = steps_in_epoch


class _CountStepsByExecution(_CountSteps):
  """Counts each of fit's executions: with a step cadence, so validation
  falls due at its step, and for data of unknown length. Only then: a
  batch hook makes fit call its batch hooks, and read their logs, every
  execution.

  Fit names an execution by its last batch as if it were full, also the
  last, shorter one of an epoch; `train` refuses a cadence with
  `steps_per_loop` on data of unknown length, where that cannot be told.
  """

  def on_train_batch_end(self, batch, logs=None):
    length = self.controller.train_length
    self._count(batch + 1 if length is None else min(batch + 1, length))


class _ControllerHooks(keras.callbacks.Callback):
  """Last in fit's callbacks, so the checkpoint holds what the others left
  (e.g. weights restored by early stopping), and the callbacks' restored
  state follows their own reset in `on_train_begin`."""

  def __init__(self, controller):
    super().__init__()
    self.controller = controller

  def on_train_begin(self, logs=None):
    self.controller.train_begun()

  def on_epoch_end(self, epoch, logs=None):
    non_finite = first_non_finite(logs or {})
    if non_finite:
      name, value = non_finite
      raise NonFiniteLossError(epoch, None, value,
                               None if name == "loss" else name)
    self.controller.epoch_done(epoch, logs or {})
