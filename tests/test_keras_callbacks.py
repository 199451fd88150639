"""Keras' own callbacks in every loop, against `model.fit`: the model
carries what `compile` gives it, the batch-level hooks are called as fit
calls them, and EMA ends training as fit ends it."""

import csv
import os

import keras
import numpy as np
import pytest

import training_loops
from loop_models import (CUSTOM_LOOPS, classification_data, classifier,
                         run_loop, sgd)


def _run(loop, callbacks, **kwargs):
  kwargs.setdefault("model_fn", classifier)  # no dropout: fit's masks differ
  kwargs.setdefault("validation_data", classification_data(examples=20,
                                                           seed=1))
  kwargs.setdefault("data", classification_data())
  return run_loop(loop, epochs=kwargs.pop("epochs", 3), callbacks=callbacks,
                  **kwargs)


def _same_weights(history, reference, atol=1e-4):
  for weight, expected in zip(history.model.get_weights(),
                              reference.model.get_weights()):
    np.testing.assert_allclose(weight, expected, atol=atol, rtol=1e-4)


def _learning_rate(history):
  return float(np.asarray(history.model.optimizer.learning_rate))


def _csv_rows(path):
  with open(path, newline="", encoding="utf-8") as stream:
    return list(csv.DictReader(stream))


# Each case: (callbacks for a run in `directory`, a check of one loop's run
# against fit's, given both directories).
def _scheduler(directory):
  del directory
  return [keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5)]


def _check_learning_rate(ours, fit, ours_dir, fit_dir):
  """Changed by the callback (from 0.1), as under fit."""
  assert _learning_rate(ours) < 0.09
  assert _learning_rate(ours) == pytest.approx(_learning_rate(fit))


def _plateau(directory):
  del directory  # never improving by 10: the rate halves every epoch
  return [keras.callbacks.ReduceLROnPlateau("loss", factor=0.5, patience=0,
                                            min_delta=10.0)]


def _tensorboard(directory):
  return [keras.callbacks.TensorBoard(os.path.join(directory, "tb"),
                                      update_freq=1)]


def _check_tensorboard(ours, fit, ours_dir, fit_dir):
  from test_callbacks import _scalars
  for split in ("train", "validation"):
    theirs = _scalars(os.path.join(fit_dir, "tb", split))
    mine = _scalars(os.path.join(ours_dir, "tb", split))
    assert set(mine) == set(theirs), split
    for tag, values in theirs.items():
      np.testing.assert_allclose(mine[tag], values, rtol=1e-4, atol=1e-6,
                                 err_msg=f"{split} {tag}")
  assert "epoch_learning_rate" in _scalars(os.path.join(ours_dir, "tb",
                                                        "train"))


def _model_checkpoint(directory):
  return [keras.callbacks.ModelCheckpoint(
      os.path.join(directory, "epoch_{epoch}.weights.h5"),
      save_weights_only=True)]


def _check_model_checkpoint(ours, fit, ours_dir, fit_dir):
  assert sorted(os.listdir(ours_dir)) == sorted(os.listdir(fit_dir))
  restored = classifier()
  restored.load_weights(os.path.join(ours_dir, "epoch_3.weights.h5"))
  for weight, expected in zip(restored.get_weights(),
                              ours.model.get_weights()):
    np.testing.assert_allclose(weight, expected)


def _csv_logger(directory):
  return [keras.callbacks.CSVLogger(os.path.join(directory, "log.csv"))]


def _check_csv_logger(ours, fit, ours_dir, fit_dir):
  mine = _csv_rows(os.path.join(ours_dir, "log.csv"))
  theirs = _csv_rows(os.path.join(fit_dir, "log.csv"))
  assert len(mine) == 3 and mine[0].keys() == theirs[0].keys()
  for row, expected in zip(mine, theirs):
    for key in expected:
      np.testing.assert_allclose(float(row[key]), float(expected[key]),
                                 rtol=1e-4, atol=1e-6, err_msg=key)


def _monitoring_accuracy(directory):
  """Mode "auto" on a metric: Keras looks the metric up in the compiled
  model to know that larger is better."""
  return [keras.callbacks.EarlyStopping("val_accuracy", patience=0),
          keras.callbacks.ModelCheckpoint(
              os.path.join(directory, "best.weights.h5"),
              monitor="val_accuracy", save_best_only=True,
              save_weights_only=True)]


def _check_same_epochs(ours, fit, ours_dir, fit_dir):
  assert ours.epochs == fit.epochs
  assert os.listdir(ours_dir) == os.listdir(fit_dir) == ["best.weights.h5"]


CASES = {
    "LearningRateScheduler": (_scheduler, _check_learning_rate),
    "ReduceLROnPlateau": (_plateau, _check_learning_rate),
    "TensorBoard": (_tensorboard, _check_tensorboard),
    "ModelCheckpoint": (_model_checkpoint, _check_model_checkpoint),
    "CSVLogger": (_csv_logger, _check_csv_logger),
    "EarlyStopping+ModelCheckpoint(val_accuracy)": (_monitoring_accuracy,
                                                    _check_same_epochs),
}


@pytest.fixture(scope="module")
def fit_runs(tmp_path_factory):
  runs = {}
  for name, (callbacks, _) in CASES.items():
    directory = str(tmp_path_factory.mktemp(f"fit_{name}"))
    runs[name] = (_run("keras_fit", callbacks(directory)), directory)
  return runs


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
@pytest.mark.parametrize("name", CASES)
def test_keras_callback_works_as_under_fit(name, loop, fit_runs, tmp_path):
  callbacks, check = CASES[name]
  fit, fit_dir = fit_runs[name]
  # One step a call, as fit's default: batch-level TensorBoard logs match.
  ours = _run(loop, callbacks(str(tmp_path)),
              steps_per_loop=1 if loop == "graph" else None)
  _same_weights(ours, fit)
  check(ours, fit, str(tmp_path), fit_dir)


@pytest.mark.parametrize("loop", training_loops.LOOPS)
def test_backup_and_restore_resumes_where_fit_does(loop, tmp_path):
  """Two epochs backed up, then a run of 3 continues with the third."""
  def backed_up(epochs, directory):
    return _run(loop, [keras.callbacks.BackupAndRestore(
        str(directory), delete_checkpoint=False)], epochs=epochs)

  backed_up(2, tmp_path / "ours")
  resumed = backed_up(3, tmp_path / "ours")
  assert resumed.epochs == [2]
  if loop != "keras_fit":
    _run("keras_fit", [keras.callbacks.BackupAndRestore(
        str(tmp_path / "fit"), delete_checkpoint=False)], epochs=2)
    _same_weights(resumed, _run("keras_fit", [
        keras.callbacks.BackupAndRestore(str(tmp_path / "fit"),
                                         delete_checkpoint=False)]))


def _ema_sgd():
  return keras.optimizers.SGD(0.1, momentum=0.9, use_ema=True,
                              ema_momentum=0.5)


@pytest.fixture(scope="module")
def fit_with_ema():
  return _run("keras_fit", [keras.callbacks.SwapEMAWeights(
      swap_on_epoch=True)], optimizer_fn=_ema_sgd)


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_ema_ends_on_the_averages_and_validates_on_them(loop, fit_with_ema):
  plain = _run(loop, [], optimizer_fn=sgd())
  ours = _run(loop, [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)],
              optimizer_fn=_ema_sgd)
  _same_weights(ours, fit_with_ema)
  np.testing.assert_allclose(ours.history["val_loss"],
                             fit_with_ema.history["val_loss"], rtol=1e-4)
  # The averages are not the weights: the comparison above can fail.
  assert not np.allclose(ours.model.get_weights()[0],
                         plain.model.get_weights()[0], atol=1e-3)


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_with_terminate_on_nan_a_nan_ends_the_run_in_fits_epoch(loop):
  """The loops raise `NonFiniteLossError` at the NaN's step, before any
  batch hook (so before `TerminateOnNaN` could stop training); fit stops at
  that batch and raises at the epoch's end. Both name the same epoch."""
  from test_non_finite_loss import _NaNAfter

  def model_fn():  # 4 steps an epoch: the 7th call is in epoch 1
    return keras.Sequential([keras.Input((4,)), _NaNAfter(7),
                             keras.layers.Dense(3, activation="softmax")])

  stopped = {}
  for run in ("keras_fit", loop):
    with pytest.raises(training_loops.NonFiniteLossError) as raised:
      _run(run, [keras.callbacks.TerminateOnNaN()], model_fn=model_fn)
    stopped[run] = raised.value.epoch
  assert stopped[loop] == stopped["keras_fit"] == 1


class _BatchRecorder(keras.callbacks.Callback):
  """Every batch-level call: (hook, batch index, sorted log keys, loss)."""

  def __init__(self):
    super().__init__()
    self.calls = []

  def _record(self, hook, batch, logs):
    logs = logs or {}
    self.calls.append((hook, batch, sorted(logs), logs.get("loss")))

  def on_train_batch_begin(self, batch, logs=None):
    self._record("train_begin", batch, logs)

  def on_train_batch_end(self, batch, logs=None):
    self._record("train_end", batch, logs)

  def on_test_batch_begin(self, batch, logs=None):
    self._record("test_begin", batch, logs)

  def on_test_batch_end(self, batch, logs=None):
    self._record("test_end", batch, logs)


@pytest.mark.parametrize("loop,steps_per_loop", [
    ("eager", None), ("function", None), ("graph", 1), ("graph", 2),
    ("graph", None)])
def test_batch_hooks_are_called_as_fit_calls_them(loop, steps_per_loop):
  """Per step in the eager and function loops; per call in the graph loop,
  as fit with `steps_per_execution`: begin with the call's first batch,
  end with its last and the running logs. 50 examples: 4 batches, the
  last partial; validation 64 examples: 4 batches."""
  recorders = {run: _BatchRecorder() for run in (loop, "keras_fit")}
  # The graph loop's default, a whole epoch a call, is fit's 4 steps.
  per_call = {loop: steps_per_loop,
              "keras_fit": steps_per_loop or (4 if loop == "graph" else 1)}
  for run, recorder in recorders.items():
    # 4 validation batches: fit numbers a call's last batch as if it were
    # whole (2 batches in a call of 4: "3"), the loops by the batch it is.
    _run(run, [recorder], epochs=2, steps_per_loop=per_call[run],
         validation_data=classification_data(examples=64, seed=1))
  ours, theirs = recorders[loop].calls, recorders["keras_fit"].calls
  assert [call[:3] for call in ours] == [call[:3] for call in theirs]
  np.testing.assert_allclose(
      [call[3] for call in ours if call[3] is not None],
      [call[3] for call in theirs if call[3] is not None], rtol=1e-4)
  assert any(call[0] == "test_end" for call in ours)


class _StopAfterBatch(keras.callbacks.Callback):

  def on_train_batch_end(self, batch, logs=None):
    if batch == 1:
      self.model.stop_training = True


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_stop_training_from_a_batch_hook_ends_the_epoch_as_in_fit(loop):
  # One step a call, so the graph loop sees batch 1 end, as fit does.
  per_call = 1 if loop == "graph" else None
  histories = {run: _run(run, [_StopAfterBatch()], epochs=3,
                         steps_per_loop=per_call)
               for run in (loop, "keras_fit")}
  assert histories[loop].epochs == histories["keras_fit"].epochs == [0]
  _same_weights(histories[loop], histories["keras_fit"])


def test_a_partial_last_call_ends_with_the_batch_it_ran():
  """4 batches in calls of 3: fit numbers the second call's end 5, as if it
  were whole; the graph loop names the last batch it ran, 3."""
  recorders = {run: _BatchRecorder() for run in ("graph", "keras_fit")}
  for run, recorder in recorders.items():
    _run(run, [recorder], epochs=1, steps_per_loop=3, validation_data=None)
  ends = {run: [call[1] for call in recorder.calls if call[0] == "train_end"]
          for run, recorder in recorders.items()}
  assert ends == {"graph": [2, 3], "keras_fit": [2, 5]}


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_a_lambda_callbacks_batch_hooks_run(loop):
  """`LambdaCallback` sets its hooks on the instance, not the class."""
  seen = {run: [] for run in (loop, "keras_fit")}
  for run, batches in seen.items():
    _run(run, [keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs, b=batches: b.append(batch))],
         epochs=1, steps_per_loop=1 if loop == "graph" else None)
  assert seen[loop] == seen["keras_fit"] == [0, 1, 2, 3]


class _StopAtEpochBegin(keras.callbacks.Callback):

  def on_epoch_begin(self, epoch, logs=None):
    if epoch == 1:
      self.model.stop_training = True


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_stop_training_from_epoch_begin_runs_one_call_as_in_fit(loop):
  """Fit checks `stop_training` after each execution, never before."""
  per_call = 1 if loop == "graph" else None
  histories = {run: _run(run, [_StopAtEpochBegin()], epochs=3,
                         steps_per_loop=per_call)
               for run in (loop, "keras_fit")}
  assert histories[loop].epochs == histories["keras_fit"].epochs == [0, 1]
  _same_weights(histories[loop], histories["keras_fit"])
