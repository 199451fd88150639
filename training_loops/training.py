"""`train`: one training run, four interchangeable ways."""

import keras
import tensorflow as tf

from training_loops import drivers, keras_fit
from training_loops.callbacks import EpochRecorder
from training_loops.checkpoints import RunCheckpoint, replay_data_order
from training_loops.history import History
from training_loops.interrupts import StopRequests, TrainingInterrupted
from training_loops.strategies import WorkerLostError
from training_loops.trainer import Trainer, TrainingDataError

LOOPS = ("eager", "function", "graph", "keras_fit")

# What a collective op raises when a peer worker dies or freezes.
_PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)


def train(model_fn, optimizer_fn, loss, train_data, *, loop="graph",
          epochs=1, validation_data=None, metrics=(), loss_weights=None,
          strategy=None, steps_per_loop=None, jit_compile=False,
          checkpoint_dir=None, log_dir=None, callbacks=(), seed=None,
          verbose=1):
  """Trains `model_fn()` with `optimizer_fn()` on `train_data`.

  Args:
    model_fn, optimizer_fn: build the model and optimizer; called inside
      `strategy.scope()`.
    loss: a `keras.losses.Loss` (e.g. from `losses`), or a dict/list of them
      for a multi-output model, combined with `loss_weights`.
    train_data, validation_data: `tf.data.Dataset`s of `(x, y)` or
      `(x, y, sample_weight)` batches; `x` and `y` may be nested. Pass a
      freshly built dataset to each run: a reshuffling dataset continues its
      sequence of orders across runs, so two runs would see different data.
    loop: one of `LOOPS`.
    epochs: the total number of epochs, counting those a resumed run did.
    metrics: `keras.metrics.Metric` objects (a dict output -> list for a
      multi-output model); copied for this run.
    strategy: a `tf.distribute.Strategy`; default: the current one.
    steps_per_loop: steps per `tf.function` call of the graph loop (default:
      a whole epoch); `steps_per_execution` for `keras_fit`.
    jit_compile: XLA-compile the step (function, graph and keras_fit);
      the graph loop compiles its loop too when batches have one static
      shape on one replica (see `drivers.GraphDriver`).
    checkpoint_dir: save every epoch there; if it holds a checkpoint,
      resume from it.
    log_dir: TensorBoard event files in `log_dir/train` and
      `log_dir/validation`.
    callbacks: `keras.callbacks.Callback`s (ours or Keras').
    seed: seeds Python, NumPy and TensorFlow before the model is built.
    verbose: 0 silent, 1 a progress bar, 2 one line per epoch.

  Returns:
    A `History`.

  Raises:
    NonFiniteLossError: the training loss became NaN or infinite.
  """
  _check_arguments(loop, epochs, train_data, validation_data)
  strategy = strategy or tf.distribute.get_strategy()
  if seed is not None:
    keras.utils.set_random_seed(seed)
  with strategy.scope():
    model, optimizer = model_fn(), optimizer_fn()
    _check_model_fits_data(model, loss, train_data)
    optimizer.build(model.trainable_variables)
    trainer = (None if loop == "keras_fit" else
               Trainer(model, optimizer, loss, loss_weights, metrics,
                       strategy))
  history = History(model=model)
  callbacks = [EpochRecorder(history, optimizer, log_dir), *callbacks]
  if loop == "keras_fit":  # the custom loops check every step themselves
    callbacks.append(keras_fit.StopOnNonFiniteLoss())
  checkpoint = None
  start = (0, 0)  # (epoch, step in it)
  if checkpoint_dir:
    checkpoint = RunCheckpoint(
        checkpoint_dir, model, optimizer, strategy, history,
        trainer.progress_variables() if trainer else ())
    start = checkpoint.restore()
    # Last: a non-finite or early-stopped epoch is seen first.
    callbacks.append(_SaveEachEpoch(checkpoint))
  replay_data_order(train_data, start[0])
  with StopRequests() as stops:
    if loop == "keras_fit":
      if start[1]:
        raise ValueError(f"{checkpoint_dir} was saved mid-epoch by a custom "
                         "loop; resume it with that loop.")
      callbacks.append(_StopAtEpochEnd(stops))
      try:
        keras_fit.fit(model, optimizer, loss, loss_weights, metrics,
                      train_data, validation_data, epochs, start[0],
                      steps_per_loop, jit_compile, callbacks, verbose)
      except _PEER_FAILURES as error:
        raise WorkerLostError(None, error) from error
      if stops.requested:
        epoch = history.epochs[-1] + 1 if history.epochs else start[0]
        raise TrainingInterrupted(stops.signal_number, epoch, 0, history,
                                  saved=checkpoint is not None)
      return history
    driver = drivers.DRIVERS[loop](trainer, jit_compile, steps_per_loop)
    _run_epochs(trainer, driver, strategy, train_data, validation_data,
                start, epochs, callbacks, verbose, stops, checkpoint,
                history)
  return history


def evaluate(model, loss, data, *, metrics=(), loss_weights=None,
             strategy=None):
  """Returns `{"loss": ..., <metric>: ...}` of `model` on `data`, computed
  with `training=False` exactly as the loops' validation is."""
  strategy = strategy or tf.distribute.get_strategy()
  with strategy.scope():
    trainer = Trainer(model, None, loss, loss_weights, metrics, strategy)
  driver = drivers.GraphDriver(trainer)
  driver.evaluate(iter(strategy.experimental_distribute_dataset(data)))
  return _as_floats(trainer.eval_logs(prefix=""))


def _run_epochs(trainer, driver, strategy, train_data, validation_data,
                start, epochs, callbacks, verbose, stops, checkpoint,
                history):
  """The outer loop of the custom loops, with Keras' callback order.

  Starts at `start = (epoch, step)`: a run stopped mid-epoch continues with
  that epoch's running metrics (restored) and its next batch. On a stop
  request it saves that position and raises `TrainingInterrupted`.
  """
  train_batches = strategy.experimental_distribute_dataset(train_data)
  validation_batches = (
      strategy.experimental_distribute_dataset(validation_data)
      if validation_data is not None else None)
  steps_per_epoch = int(train_data.cardinality())
  callback_list = keras.callbacks.CallbackList(callbacks,
                                               model=trainer.model)

  def run_epoch(epoch, resumed_step):
    if verbose:
      print(f"Epoch {epoch + 1}/{epochs}")
    callback_list.on_epoch_begin(epoch)
    if not resumed_step:
      trainer.reset()
    progress_bar = keras.utils.Progbar(
        steps_per_epoch if steps_per_epoch > 0 else None, verbose=verbose,
        stateful_metrics=list(trainer.train_logs()) + ["val_loss"])

    def show_progress(step):
      if verbose == 1:
        progress_bar.update(step, _as_floats(trainer.train_logs()).items())

    iterator = iter(train_batches)
    for _ in range(resumed_step):  # batches trained before the stop
      next(iterator)
    steps = driver.train_epoch(iterator, epoch, show_progress,
                               lambda: stops.requested, resumed_step)
    if stops.requested:
      if checkpoint:
        checkpoint.save(epoch, steps)
      raise TrainingInterrupted(stops.signal_number, epoch, steps, history,
                                saved=checkpoint is not None)
    if steps == 0:  # a dataset of unknown length that turned out empty
      raise ValueError("train_data yielded no batches.")
    logs = trainer.train_logs()
    if validation_batches is not None:
      callback_list.on_test_begin()
      driver.evaluate(iter(validation_batches))
      callback_list.on_test_end()
      logs.update(trainer.eval_logs())
    logs = _as_floats(logs)
    progress_bar.update(steps, logs.items(), finalize=True)
    callback_list.on_epoch_end(epoch, logs)

  trainer.model.stop_training = False
  callback_list.on_train_begin()
  first_epoch, first_step = start
  for epoch in range(first_epoch, epochs):
    try:
      run_epoch(epoch, first_step if epoch == first_epoch else 0)
    except tf.errors.InvalidArgumentError as error:
      raise TrainingDataError(epoch, error) from error
    except _PEER_FAILURES as error:
      raise WorkerLostError(epoch, error) from error
    if trainer.model.stop_training:
      break
  callback_list.on_train_end()


class _StopAtEpochEnd(keras.callbacks.Callback):
  """Ends `model.fit` after the epoch in which a stop was requested (fit
  would otherwise report, and we checkpoint, a partial epoch as whole)."""

  def __init__(self, stops):
    super().__init__()
    self.stops = stops

  def on_epoch_end(self, epoch, logs=None):
    if self.stops.requested:
      self.model.stop_training = True


class _SaveEachEpoch(keras.callbacks.Callback):
  """Saves a `RunCheckpoint` after each epoch (after the other callbacks,
  so weights restored by EarlyStopping are what gets saved)."""

  def __init__(self, checkpoint):
    super().__init__()
    self.checkpoint = checkpoint

  def on_epoch_end(self, epoch, logs=None):
    self.checkpoint.save(epoch + 1)


def _check_model_fits_data(model, loss, data):
  """Runs the model (inference mode: no state changes) and, for a single
  output, the loss on one zero example shaped like `data`'s elements.

  Builds an unbuilt model, so every variable exists before a checkpoint is
  restored into it or a replica step runs; raises a `ValueError` naming the
  data's and the model's shapes when they do not fit.
  """
  x_spec, y_spec = data.element_spec[:2]
  x = _zero_example(x_spec)
  try:
    predictions = model(x, training=False)
  except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
    raise ValueError(
        f"The model does not accept the data's inputs "
        f"{_shapes(x_spec)}: {_first_line(error)}") from None
  if not isinstance(loss, keras.losses.Loss):
    return  # multi-output: each output's loss is checked when it runs
  try:
    loss(_zero_example(y_spec), predictions)
  except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
    raise ValueError(
        f"The model's outputs {_shapes(predictions)} do not fit the data's "
        f"targets {_shapes(y_spec)} under {type(loss).__name__}: "
        f"{_first_line(error)}") from None


def _zero_example(spec):
  return tf.nest.map_structure(
      lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype),
      spec)


def _shapes(structure):
  shapes = tf.nest.map_structure(lambda t: tuple(t.shape), structure)
  return shapes


def _first_line(error):
  return str(error).strip().splitlines()[0]


def _check_arguments(loop, epochs, train_data, validation_data):
  if loop not in LOOPS:
    raise ValueError(f"Unknown loop {loop!r}; expected one of "
                     f"{', '.join(LOOPS)}.")
  if not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f"epochs must be a positive int, got {epochs!r}.")
  for name, data in (("train_data", train_data),
                     ("validation_data", validation_data)):
    if data is None and name == "validation_data":
      continue
    if not isinstance(data, tf.data.Dataset):
      raise ValueError(f"{name} must be a batched tf.data.Dataset of (x, y) "
                       f"or (x, y, sample_weight), got {type(data).__name__}.")
    if not isinstance(data.element_spec, tuple) or not (
        2 <= len(data.element_spec) <= 3):
      raise ValueError(f"{name} must yield (x, y) or (x, y, sample_weight) "
                       f"batches, got elements {data.element_spec}.")
    if int(data.cardinality()) == 0:
      raise ValueError(f"{name} is empty: it yields no batches.")


def _as_floats(logs):
  return {key: float(value) for key, value in logs.items()}
