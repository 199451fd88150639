"""The four loops against each other and against model.fit, on tiny models."""

import collections
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import layers
import losses
import training_loops
from training_loops import drivers
from training_loops.checkpoints import RunCheckpoint
import multi_worker_job
from loop_models import (assert_same_run, classification_data, classifier,
                         sgd, wait_for_epochs)

CUSTOM_LOOPS = ("eager", "function", "graph")


def _accuracy():
  return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


def _run(loop, epochs=2, data=None, **kwargs):
  kwargs.setdefault("metrics", [_accuracy()])
  kwargs.setdefault("seed", 3)
  kwargs.setdefault("verbose", 0)
  return training_loops.train(
      kwargs.pop("model_fn", lambda: classifier(dropout_seed=7)),
      kwargs.pop("optimizer_fn", sgd()),
      kwargs.pop("loss", losses.SparseCategoricalCrossentropy()),
      data if data is not None else classification_data(sample_weights=True),
      loop=loop, epochs=epochs, **kwargs)


@pytest.fixture(scope="module")
def histories():
  validation = classification_data(examples=20, seed=1)
  return {loop: _run(loop, validation_data=validation)
          for loop in training_loops.LOOPS}


def test_every_loop_reports_the_same_keys(histories):
  for history in histories.values():
    assert sorted(history.history) == ["accuracy", "loss", "val_accuracy",
                                       "val_loss"]
    assert history.epochs == [0, 1]
    assert len(history.steps_per_second) == len(history.wall_seconds) == 2
    assert all(rate > 0 for rate in history.steps_per_second)


def test_custom_loops_agree_and_match_model_fit(histories):
  reference = histories["eager"].history
  for loop in ("function", "graph"):
    for key, values in histories[loop].history.items():
      np.testing.assert_allclose(values, reference[key], rtol=1e-5,
                                 err_msg=f"{loop} {key}")
  for key, values in histories["keras_fit"].history.items():
    np.testing.assert_allclose(values, reference[key], rtol=1e-3,
                               err_msg=f"keras_fit {key}")


def test_loss_is_the_example_weighted_epoch_mean():
  """Recomputes the first epoch's loss with NumPy, batch by batch."""
  data = classification_data(sample_weights=True)
  model = classifier()
  keras.utils.set_random_seed(3)
  model = classifier()
  optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
  total, examples = 0.0, 0
  for x, y, w in data:
    with tf.GradientTape() as tape:
      probs = model(x, training=True)
      per_example = -np.log(np.clip(probs.numpy()[np.arange(len(y)), y],
                                    1e-7, 1 - 1e-7))
      batch_loss = tf.reduce_sum(
          keras.losses.sparse_categorical_crossentropy(y, probs) * w) / len(y)
    optimizer.apply_gradients(zip(tape.gradient(batch_loss,
                                                model.trainable_variables),
                                  model.trainable_variables))
    total += float(np.sum(per_example * w.numpy()))
    examples += len(y)
  history = _run("graph", epochs=1, model_fn=classifier, metrics=[])
  np.testing.assert_allclose(history.history["loss"][0], total / examples,
                             rtol=1e-5)


def test_unknown_loop_names_the_choices():
  with pytest.raises(ValueError, match="eager, function, graph, keras_fit"):
    _run("fast")


@pytest.mark.parametrize("bad,match", [
    (dict(epochs=0), "epochs must be a positive int"),
    (dict(data=np.zeros((4, 2))), "batched tf.data.Dataset"),
    (dict(jit_compile=True, loop="eager"), "jit_compile needs"),
    (dict(metrics=["accuracy"]), "keras.metrics.Metric objects"),
    (dict(steps_per_loop=0), "steps_per_loop must be >= 1")])
def test_bad_arguments_are_clear_errors(bad, match):
  loop = bad.pop("loop", "graph")
  with pytest.raises(ValueError, match=match):
    _run(loop, **bad)


def _trainer():
  keras.utils.set_random_seed(0)
  model, optimizer = classifier(), keras.optimizers.SGD(0.1)
  optimizer.build(model.trainable_variables)
  return training_loops.Trainer(model, optimizer,
                                losses.SparseCategoricalCrossentropy())


def test_partial_last_batch_does_not_retrace_every_epoch():
  data = classification_data()  # batches of 16, 16, 16, 2
  function_driver = drivers.FunctionDriver(_trainer())
  graph_driver = drivers.GraphDriver(_trainer(), steps_per_loop=3)
  for epoch in range(4):
    assert function_driver.train_epoch(iter(data), epoch, lambda s: None) == 4
    assert graph_driver.train_epoch(iter(data), epoch, lambda s: None) == 4
  # The batch is fetched inside the function: one trace for all shapes.
  assert function_driver.train_next.experimental_get_tracing_count() == 1
  assert graph_driver.train_steps.experimental_get_tracing_count() == 1


def test_evaluate_matches_model_evaluate(histories):
  model = histories["graph"].model
  data = classification_data(examples=20, seed=1)
  ours = training_loops.evaluate(model, losses.SparseCategoricalCrossentropy(),
                                 data, metrics=[_accuracy()])
  model.compile(loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=[_accuracy()])
  theirs = model.evaluate(data, return_dict=True, verbose=0)
  assert sorted(ours) == sorted(theirs) == ["accuracy", "loss"]
  for key in ours:
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5)


def test_steps_use_training_flag():
  """Training updates BatchNorm's moving statistics (training=True);
  validation loss equals the model evaluated with training=False."""
  validation = classification_data(examples=20, seed=1)
  for loop in CUSTOM_LOOPS:
    history = _run(loop, epochs=1, validation_data=validation,
                   model_fn=classifier)
    model = history.model
    batch_norm = model.layers[1]
    assert not np.allclose(batch_norm.moving_mean, 0.0)
    total = count = 0
    for x, y in validation:
      probs = model(x, training=False)
      total += float(tf.reduce_sum(
          keras.losses.sparse_categorical_crossentropy(y, probs)))
      count += len(y)
    np.testing.assert_allclose(history.history["val_loss"][0], total / count,
                               rtol=1e-5)


def test_graph_loop_with_steps_per_loop_and_xla_matches():
  # No dropout: XLA draws different (still seeded) random numbers.
  whole_epoch = _run("graph", model_fn=classifier).history
  for kwargs in (dict(steps_per_loop=3), dict(jit_compile=True)):
    for key, values in _run("graph", model_fn=classifier,
                            **kwargs).history.items():
      np.testing.assert_allclose(values, whole_epoch[key], rtol=1e-4,
                                 err_msg=f"{kwargs} {key}")


@pytest.mark.parametrize("steps_per_loop", [None, 3])
def test_graph_loop_xla_chunks_match_the_graph_loop(monkeypatch,
                                                    steps_per_loop):
  """Static batch shapes: XLA runs chunks of 2 batches (6 an epoch; with
  steps_per_loop=3, calls of 2 + 1 steps, the 1 padded to a chunk)."""
  chunked = []
  monkeypatch.setattr(drivers, "XLA_CHUNK_STEPS", 2)
  monkeypatch.setattr(drivers, "_train_in_chunks",
                      _recording(drivers._train_in_chunks, chunked))
  data = classification_data(examples=48, batch_size=8, drop_remainder=True)
  reference = _run("graph", data=data, model_fn=classifier)
  fused = _run("graph", data=data, model_fn=classifier, jit_compile=True,
               steps_per_loop=steps_per_loop)
  assert chunked, "the XLA chunk path was not taken"
  assert_same_run(fused, reference, rtol=1e-4, atol=1e-6)


def _recording(function, calls):
  def recorded(*args):
    calls.append(args)
    return function(*args)
  return recorded


def test_mirrored_two_replicas_equal_one_device():
  """Global batch 16 split over two CPUs, with a partial last batch of 2.

  Without BatchNorm and Dropout: each replica normalizes with its own
  batch statistics (Keras' default too) and draws its own masks."""
  mirrored = training_loops.make_strategy("mirrored", cpu_replicas=2)
  assert mirrored.num_replicas_in_sync == 2
  model_fn = lambda: classifier(batch_norm=False)
  for loop in training_loops.LOOPS:
    single = _run(loop, model_fn=model_fn).history
    replicated = _run(loop, model_fn=model_fn, strategy=mirrored).history
    for key, values in replicated.items():
      np.testing.assert_allclose(values, single[key], rtol=1e-4,
                                 err_msg=f"{loop} {key}")


def test_make_strategy_names():
  with pytest.raises(ValueError, match="default, one_device, mirrored"):
    training_loops.make_strategy("tpu")
  assert isinstance(training_loops.make_strategy("one_device"),
                    tf.distribute.OneDeviceStrategy)


@pytest.mark.parametrize("loop", training_loops.LOOPS)
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(loop, tmp_path):
  def run(epochs, checkpoint_dir=None):
    keras.utils.set_random_seed(3)  # the shuffle order depends on it
    data = classification_data(shuffle=True)  # reshuffled every epoch
    return _run(loop, epochs=epochs, data=data, checkpoint_dir=checkpoint_dir,
                model_fn=lambda: classifier(dropout_seed=5))

  uninterrupted = run(4)
  run(2, tmp_path)  # "stopped" after epoch 2
  resumed = run(4, tmp_path)
  assert resumed.epochs == [0, 1, 2, 3]  # epochs 0-1 from the first call
  assert_same_run(resumed, uninterrupted, rtol=1e-5, atol=1e-6)
  assert len(run(4, tmp_path).epochs) == 4  # already done: nothing to run


def _scalars(directory):
  accumulator = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  scalars = {}
  for tag in accumulator.Tags()["tensors"]:
    values = [tf.make_ndarray(event.tensor_proto)
              for event in accumulator.Tensors(tag)]
    if all(v.dtype.kind == "f" and v.ndim == 0 for v in values):
      scalars[tag] = [float(v) for v in values]
  return scalars


def test_tensorboard_events_carry_keras_tags(tmp_path):
  validation = classification_data(examples=20, seed=1)
  keras_dir = str(tmp_path / "keras_callback")
  _run("keras_fit", validation_data=validation,
       callbacks=[keras.callbacks.TensorBoard(keras_dir)])
  keras_tags = {split: set(_scalars(os.path.join(keras_dir, split)))
                for split in ("train", "validation")}
  for loop in ("graph", "keras_fit"):
    log_dir = str(tmp_path / loop)
    history = _run(loop, validation_data=validation, log_dir=log_dir)
    train = _scalars(os.path.join(log_dir, "train"))
    validation_scalars = _scalars(os.path.join(log_dir, "validation"))
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= (
        keras_tags["train"])
    assert keras_tags["train"] <= set(train)
    assert {"epoch_loss", "epoch_accuracy"} <= keras_tags["validation"]
    assert {"epoch_loss", "epoch_accuracy"} <= set(validation_scalars)
    np.testing.assert_allclose(train["epoch_loss"], history.history["loss"],
                               rtol=1e-6)
    np.testing.assert_allclose(validation_scalars["epoch_loss"],
                               history.history["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(train["epoch_learning_rate"], [0.1, 0.1],
                               rtol=1e-6)
    np.testing.assert_allclose(train["epoch_steps_per_second"],
                               history.steps_per_second, rtol=1e-6)


@pytest.mark.parametrize("sequence,patience,min_delta", [
    ([1.0, 0.5, 0.6, 0.7, 0.2], 1, 0.0),
    ([1.0, 0.99, 0.98, 0.97, 0.5], 1, 0.05),
    ([3.0, 2.0, 1.0, 0.5, 0.4], 0, 0.0)])
def test_early_stopping_stops_where_keras_does(sequence, patience, min_delta):
  def stopped_epoch(callback):
    model = keras.Sequential([keras.Input((1,)), layers.Dense(1)])
    callback.set_model(model)
    model.stop_training = False
    callback.on_train_begin()
    for epoch, value in enumerate(sequence):
      model.layers[0].kernel.assign([[float(epoch)]])
      callback.on_epoch_end(epoch, {"val_loss": value})
      if model.stop_training:
        break
    callback.on_train_end()  # where Keras restores the best weights
    return epoch, float(model.layers[0].kernel.numpy()[0, 0])

  ours = stopped_epoch(training_loops.EarlyStopping(
      patience=patience, min_delta=min_delta, restore_best_weights=True))
  theirs = stopped_epoch(keras.callbacks.EarlyStopping(
      patience=patience, min_delta=min_delta, restore_best_weights=True))
  assert ours == theirs


def test_early_stopping_and_best_checkpoint_in_every_loop(tmp_path):
  validation = classification_data(examples=20, seed=1)
  for loop in training_loops.LOOPS:
    stopper = training_loops.EarlyStopping(monitor="val_loss", patience=1)
    best = training_loops.BestModelCheckpoint(
        tmp_path / f"{loop}.weights.h5", monitor="val_accuracy")
    # A learning rate of 0 never improves (no BatchNorm statistics move
    # either): stop after epoch 1 (0-based).
    history = _run(loop, epochs=6, validation_data=validation,
                   optimizer_fn=sgd(0.0), callbacks=[stopper, best],
                   model_fn=lambda: classifier(batch_norm=False))
    assert history.epochs == [0, 1], loop
    assert stopper.stopped_epoch == 1 and best.best_epoch == 0
    restored = classifier(batch_norm=False)
    restored.load_weights(tmp_path / f"{loop}.weights.h5")
    for ours, saved in zip(history.model.get_weights(),
                           restored.get_weights()):
      np.testing.assert_allclose(ours, saved)


def _executed_functions(log_dir):
  """How often each `tf.function` ran in the one profiler trace under
  `log_dir`, by name without its tracing suffix."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  (trace,) = log_dir.rglob("*.xplane.pb")
  space = xplane_pb2.XSpace.FromString(trace.read_bytes())
  prefix = "EagerLocalExecute: __inference_"
  names = [metadata.name for plane in space.planes
           for line in plane.lines for event in line.events
           for metadata in [plane.event_metadata[event.metadata_id]]]
  return collections.Counter(name[len(prefix):].rsplit("_", 1)[0]
                             for name in names if name.startswith(prefix))


@pytest.mark.parametrize("loop, function, calls_per_epoch", [
    ("function", "train_next", lambda steps: steps + 1),  # + the end's fetch
    ("graph", "train_steps", lambda steps: 1),
    ("keras_fit", "multi_step_on_iterator", lambda steps: steps)])
def test_profile_epoch_traces_one_epochs_training_only(
    loop, function, calls_per_epoch, tmp_path):
  data = classification_data()
  _run(loop, epochs=3, data=data,
       validation_data=classification_data(examples=20, seed=1),
       callbacks=[training_loops.ProfileEpoch(tmp_path, epoch=1)])
  # Neither the other epochs' steps nor validation's.
  assert _executed_functions(tmp_path) == {
      function: calls_per_epoch(int(data.cardinality()))}


class _NaNAfter(keras.layers.Layer):
  """The identity until its `calls`-th training call, then NaN."""

  def __init__(self, calls, **kwargs):
    super().__init__(**kwargs)
    self.calls = calls

  def build(self, input_shape):
    self.count = self.add_weight(shape=(), initializer="zeros",
                                 trainable=False, name="count")

  def call(self, inputs, training=None):
    if not training:
      return inputs
    self.count.assign_add(1.0)
    poison = tf.where(tf.equal(self.count, float(self.calls)), np.nan, 0.0)
    return inputs + poison


@pytest.mark.parametrize("loop, jit_compile", [
    *((loop, False) for loop in training_loops.LOOPS), ("graph", True)])
def test_non_finite_loss_names_epoch_and_step_and_keeps_checkpoint(
    loop, jit_compile, tmp_path):
  def model_fn():  # 4 steps an epoch: the 7th call is epoch 1, step 3
    return keras.Sequential([keras.Input((4,)), _NaNAfter(7),
                             layers.Dense(3, "softmax")])

  # With XLA, static shapes (4 batches of 12) for the graph loop's chunks.
  data = (classification_data(examples=48, batch_size=12,
                              drop_remainder=True) if jit_compile else None)
  where = ("model.fit reports no step" if loop == "keras_fit"
           else "step 3 of that epoch")
  with pytest.raises(training_loops.NonFiniteLossError,
                     match=rf"nan at epoch 1 \(0-based\), {where}"):
    _run(loop, epochs=3, data=data, model_fn=model_fn,
         checkpoint_dir=tmp_path, jit_compile=jit_compile)
  model, optimizer = model_fn(), keras.optimizers.SGD()
  optimizer.build(model.trainable_variables)
  position = RunCheckpoint(tmp_path, model, optimizer,
                           tf.distribute.get_strategy(),
                           training_loops.History()).restore()
  assert position == (1, 0)  # after epoch 0, not the poisoned epoch 1
  assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def _wide_deep_model():
  wide = keras.Input((2,), name="wide")
  deep = keras.Input((3,), name="deep")
  hidden = layers.Dense(6, "relu")(deep)
  merged = layers.WideDeepMerge()([wide, hidden])
  return keras.Model({"wide": wide, "deep": deep},
                     {"main": layers.Dense(1, name="main")(merged),
                      "aux": layers.Dense(1, name="aux")(hidden)})


def test_multi_input_multi_output_agree_with_model_fit():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(40, 5)).astype("float32")
  target = (x[:, :1] * 2 - x[:, 3:4]).astype("float32")
  data = tf.data.Dataset.from_tensor_slices(
      ({"wide": x[:, :2], "deep": x[:, 2:]},
       {"main": target, "aux": target})).batch(8)
  # Equal batches: model.fit averages per-output losses per batch, ignoring
  # a partial last batch's size (its static batch size is None); our loops
  # weight by examples, as Keras does for the total loss.
  kwargs = dict(model_fn=_wide_deep_model, data=data,
                loss={"main": losses.MeanSquaredError(),
                      "aux": losses.MeanSquaredError()},
                loss_weights={"main": 0.9, "aux": 0.1},
                metrics={"main": [keras.metrics.MeanAbsoluteError(
                    name="mae")]},
                validation_data=data, optimizer_fn=sgd(0.01))
  results = {loop: _run(loop, **kwargs).history
             for loop in training_loops.LOOPS}
  assert sorted(results["graph"]) == sorted(results["keras_fit"]) == [
      "aux_loss", "loss", "main_loss", "main_mae", "val_aux_loss",
      "val_loss", "val_main_loss", "val_main_mae"]
  for loop, history in results.items():
    for key, values in history.items():
      np.testing.assert_allclose(values, results["eager"][key],
                                 rtol=1e-3 if loop == "keras_fit" else 1e-5,
                                 err_msg=f"{loop} {key}")


def test_progress_bar_and_silence():
  for verbose, expect_output in ((1, True), (0, False)):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      _run("function", epochs=1, verbose=verbose)
    printed = out.getvalue()
    assert ("loss:" in printed and "accuracy:" in printed) == expect_output
    assert bool(printed) == expect_output


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for sock in sockets:
    sock.bind(("127.0.0.1", 0))
  ports = [sock.getsockname()[1] for sock in sockets]
  for sock in sockets:
    sock.close()
  return ports


def _start_workers(*arguments):
  """Two `multi_worker_job.py` processes on localhost ports."""
  workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
  tests_dir = os.path.dirname(__file__)
  processes = []
  for index in range(2):
    environment = dict(os.environ, TF_CONFIG=json.dumps({
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": index}}))
    processes.append(subprocess.Popen(
        [sys.executable, os.path.join(tests_dir, "multi_worker_job.py"),
         *map(str, arguments)], cwd=tests_dir, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return processes


def _finish(processes, timeout=240):
  """Waits for every process (killing all on timeout); returns (code,
  stdout, stderr) of each."""
  try:
    outcomes = []
    for process in processes:
      stdout, stderr = process.communicate(timeout=timeout)
      outcomes.append((process.returncode, stdout, stderr))
    return outcomes
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()


def _results_of(outcomes):
  for code, stdout, stderr in outcomes:
    assert code == 0, stderr[-3000:]
  return [json.loads(stdout.strip().splitlines()[-1])
          for _, stdout, _ in outcomes]


def test_two_workers_on_localhost_equal_one_process():
  outputs = _results_of(_finish(_start_workers("graph")))
  single = multi_worker_job.run("graph").history
  for output in outputs:
    assert output["replicas"] == 2
    for key, values in single.items():
      np.testing.assert_allclose(output["history"][key], values, rtol=1e-4,
                                 err_msg=key)


def test_a_dead_worker_stops_its_peer_fast_and_a_restart_resumes(tmp_path):
  epochs = 12
  processes = _start_workers("graph", epochs, tmp_path, 0.3)
  wait_for_epochs(tmp_path, 3, processes[0])
  processes[1].kill()  # SIGKILL: no goodbye to its peer
  killed_at = time.monotonic()
  code, _, stderr = _finish(processes[:1], timeout=120)[0]
  assert time.monotonic() - killed_at < 60
  assert code == 3, stderr[-3000:]
  assert "A peer worker stopped responding" in stderr
  _finish(processes[1:])
  # Restart both: they resume from the chief's last checkpoint.
  outputs = _results_of(_finish(_start_workers("graph", epochs, tmp_path)))
  single = multi_worker_job.run("graph", epochs=epochs).history
  for output in outputs:
    np.testing.assert_allclose(output["history"]["loss"], single["loss"],
                               rtol=1e-4)
