"""The four loops against each other and against model.fit, on tiny models;
and a loop added the way BUILD.md's recipe says."""

import contextlib
import logging
import io

import keras
import numpy as np
import pytest
import tensorflow as tf

import layers
import losses
import training_loops
from training_loops import drivers, graph_loops, xla_chunks
from training_loops.supervised_step import Trainer
from loop_models import (CUSTOM_LOOPS, accuracy, assert_same_run,
                         classification_data, classifier, run_loop, sgd,
                         two_regressions)


@pytest.fixture(scope="module")
def histories():
  validation = classification_data(examples=20, seed=1)
  return {loop: run_loop(loop, validation_data=validation)
          for loop in training_loops.LOOPS}


def test_every_loop_reports_the_same_keys(histories):
  for history in histories.values():
    assert sorted(history.history) == ["accuracy", "learning_rate", "loss",
                                       "val_accuracy", "val_loss"]
    assert history.epochs == [0, 1]
    assert len(history.steps_per_second) == len(history.wall_seconds) == 2
    assert all(rate > 0 for rate in history.steps_per_second)


# How far each custom loop's weights and history may sit from fit's, as
# measured: the compiled loops run fit's ops, dropout masks included, and
# end on its weights to the bit; eagerly the same ops run one by one, and
# float32 rounds differently in a few fused ones (1.2e-6 in the weights,
# 2.2e-7 relative in the history, here).
FROM_FIT = {"function": {"rtol": 1e-7}, "graph": {"rtol": 1e-7},
            "eager": {"rtol": 5e-7, "atol": 2e-6}}


def test_custom_loops_match_model_fit_in_weights_and_history(histories):
  for loop, tolerance in FROM_FIT.items():
    assert_same_run(histories[loop], histories["keras_fit"], **tolerance)


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
  history = run_loop("graph", epochs=1, model_fn=classifier, metrics=[])
  np.testing.assert_allclose(history.history["loss"][0], total / examples,
                             rtol=1e-5)


def test_the_loss_differentiates_and_reports_as_the_sum_over_the_count():
  """The step differentiates `sum * (1 / count)`, whose gradient is one op
  where the division's is ten: the gradients must be the division's to the
  bit, and the reported mean is the division itself."""
  model = classifier()
  trainer = Trainer(model, sgd()(), losses.SparseCategoricalCrossentropy())
  x, y = next(iter(classification_data()))
  with tf.GradientTape(persistent=True) as tape:
    predictions = model(x, training=True)
    loss = trainer._loss(y, predictions, None)
    values = trainer.output_losses[0].per_example(y, predictions)
    divided = tf.math.divide_no_nan(tf.reduce_sum(values),
                                    tf.cast(tf.size(values), tf.float32))
  for ours, reference in zip(
      tape.gradient(loss.replica, model.trainable_variables),
      tape.gradient(divided, model.trainable_variables)):
    np.testing.assert_array_equal(ours, reference)
  assert float(loss.tracked["loss"][0]) == float(divided)


@pytest.mark.parametrize("loss_weights, loss_scale_factor", [
    ({"cls": 0.3, "reg": 0.7}, None),  # weights that are not powers of two
    ({"cls": 1.0, "reg": 1.0}, 3.0),   # nor is the loss scale
    ({"cls": 0.5, "reg": 1.0}, 4.0),   # the product's gradient, exactly
])
def test_custom_loops_train_exactly_as_fit_with_loss_weights_and_scale(
    loss_weights, loss_scale_factor):
  """The step differentiates `sum * (1 / count)` only where that is the
  division's gradient to the bit; elsewhere it divides, so the weights
  stay fit's exactly."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(36, 4)).astype("float32")
  targets = {"cls": rng.integers(0, 3, size=36),
             "reg": rng.normal(size=(36, 1)).astype("float32")}

  def model_fn():
    inputs = keras.Input((4,))
    hidden = layers.Dense(8, "relu")(inputs)
    return keras.Model(inputs, {"cls": layers.Dense(3, name="cls")(hidden),
                                "reg": layers.Dense(1, name="reg")(hidden)})
  weights = {}
  for loop in ("eager", "graph", "keras_fit"):
    history = training_loops.train(
        model_fn,
        lambda: keras.optimizers.SGD(0.1,
                                     loss_scale_factor=loss_scale_factor),
        {"cls": losses.SparseCategoricalCrossentropy(from_logits=True),
         "reg": losses.MeanSquaredError()},
        tf.data.Dataset.from_tensor_slices((x, targets)).batch(12),
        loop=loop, epochs=3, loss_weights=loss_weights, seed=1, verbose=0)
    weights[loop] = history.model.get_weights()
  # The eager loop, with a loss scale of 3, already differed from fit in the
  # last bits before the product (at 4cdefcf): its scaled loss is an eager
  # op, fit's a graph's. With powers of two it is exact.
  exact = ("graph", "eager") if loss_scale_factor != 3.0 else ("graph",)
  for loop in exact:
    for ours, fit in zip(weights[loop], weights["keras_fit"]):
      np.testing.assert_array_equal(ours, fit, err_msg=loop)


def test_unknown_loop_names_the_choices():
  with pytest.raises(ValueError, match="eager, function, graph, keras_fit"):
    run_loop("fast")


@pytest.mark.parametrize("bad,match", [
    (dict(epochs=0), "epochs must be a positive int"),
    (dict(data=np.zeros((4, 2))), "batched tf.data.Dataset"),
    (dict(jit_compile=True, loop="eager"), "jit_compile needs"),
    (dict(steps_per_loop=2, loop="eager"), "steps_per_loop needs"),
    (dict(steps_per_loop=2, loop="function"), "steps_per_loop needs"),
    (dict(metrics=["accuracy"]), "keras.metrics.Metric objects"),
    (dict(steps_per_loop=0), "steps_per_loop must be >= 1")])
def test_bad_arguments_are_clear_errors(bad, match):
  loop = bad.pop("loop", "graph")
  with pytest.raises(ValueError, match=match):
    run_loop(loop, **bad)


def _trainer():
  keras.utils.set_random_seed(0)
  model, optimizer = classifier(), keras.optimizers.SGD(0.1)
  optimizer.build(model.trainable_variables)
  return training_loops.Trainer(model, optimizer,
                                losses.SparseCategoricalCrossentropy())


def test_partial_last_batch_does_not_retrace_every_epoch():
  data = classification_data()  # batches of 16, 16, 16, 2
  function_driver = drivers.FunctionDriver(_trainer())
  graph_driver = drivers.GraphDriver(
      _trainer(), training_loops.LoopOptions(steps_per_loop=3))
  for _ in range(4):  # epochs
    for driver in (function_driver, graph_driver):
      run_steps, steps = driver.stepper(iter(data)), 0
      while True:  # calls, as the controller makes them
        ran, _ = run_steps(driver.steps_per_call)
        steps += ran
        if ran < driver.steps_per_call:
          break
      assert steps == 4
  # The batch is fetched inside the function: one trace for all shapes.
  assert function_driver.train_next.experimental_get_tracing_count() == 1
  assert graph_driver.train_steps.experimental_get_tracing_count() == 1


class _SeesEagerTensors(keras.layers.Layer):
  """Records, each call, whether it ran eagerly and the value it saw."""

  def __init__(self):
    super().__init__()
    self.seen = []

  def call(self, inputs):
    if tf.executing_eagerly():
      self.seen.append(float(tf.reduce_sum(inputs)))
    else:
      self.seen.append("graph")
    return inputs


def test_eager_loop_runs_the_model_and_loss_eagerly_and_compiles_the_rest():
  """What a researcher steps through (the model's call, the loss) sees real
  tensors every step; the optimizer and metric updates run compiled, traced
  once for the full batches and once for the partial last one."""
  data = classification_data()  # batches of 16, 16, 16, 2
  probe = _SeesEagerTensors()
  seen_labels = []

  class Loss(losses.SparseCategoricalCrossentropy):
    def call(self, y_true, y_pred):
      seen_labels.append(tf.executing_eagerly() and y_true.numpy().tolist())
      return super().call(y_true, y_pred)

  def model_fn():
    return keras.Sequential([keras.Input((4,)), probe,
                             layers.Dense(3, "softmax")])
  trainers = []
  original = drivers.EagerDriver.__init__

  def remember(self, trainer, options=training_loops.LoopOptions()):
    original(self, trainer, options)
    trainers.append(trainer)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(drivers.EagerDriver, "__init__", remember)
    training_loops.train(model_fn, sgd(), Loss(), data, loop="eager",
                         epochs=2, metrics=[accuracy()], verbose=0)
  expected = [float(np.sum(x)) for x, _ in data] * 2
  # (The calls before are Keras building the model.)
  assert probe.seen[-len(expected):] == pytest.approx(expected)
  assert seen_labels[-len(expected):] == [y.numpy().tolist()
                                          for _, y in data] * 2
  [update] = trainers[0].compiled["update"].functions.values()
  assert update.experimental_get_tracing_count() == 2


def test_eager_loop_runs_the_update_eagerly_when_functions_run_eagerly():
  eager_updates = []

  class Accuracy(keras.metrics.SparseCategoricalAccuracy):
    def update_state(self, y_true, y_pred, sample_weight=None):
      eager_updates.append(tf.executing_eagerly())
      return super().update_state(y_true, y_pred, sample_weight)

  tf.config.run_functions_eagerly(True)
  try:
    training_loops.train(classifier, sgd(),
                         losses.SparseCategoricalCrossentropy(),
                         classification_data(), loop="eager",
                         metrics=[Accuracy()], verbose=0)
  finally:
    tf.config.run_functions_eagerly(False)
  # Four batches; the calls before are Keras building the metric.
  assert eager_updates[-4:] == [True] * 4


def test_eager_loop_trains_the_layers_trainable_now():
  """Freezing one layer, then unfreezing it and freezing another of the
  same shapes: the eager loop's compiled update follows each change, as
  Keras' `run_eagerly` does (a trace keeps the variables it saw)."""
  snapshots = []

  class Freeze(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      first, second = self.model.layers[:2]
      if epoch == 1:
        first.trainable = False
      if epoch == 2:
        first.trainable, second.trainable = True, False
      snapshots.append([layer.get_weights()[0] for layer in (first, second)])

  def model_fn():
    return keras.Sequential([keras.Input((4,)), layers.Dense(4, "relu"),
                             layers.Dense(4, "relu"),
                             layers.Dense(3, "softmax")])
  history = training_loops.train(
      model_fn, sgd(), losses.SparseCategoricalCrossentropy(),
      classification_data(), loop="eager", epochs=3, callbacks=[Freeze()],
      verbose=0)
  first, second = history.model.layers[:2]
  snapshots.append([first.get_weights()[0], second.get_weights()[0]])
  moved = [[not np.array_equal(before, after)
            for before, after in zip(*snapshots[epoch:epoch + 2])]
           for epoch in range(3)]
  assert moved == [[True, True], [False, True], [True, False]]


def test_a_masked_models_loss_and_metrics_match_fit_in_every_loop():
  """A masked model's loss is the mean over unmasked timesteps and its
  metrics count only those, in every loop as in fit (the eager loop carries
  the masks into its compiled update). The padded timesteps have labels of
  their own, so a loop that ignored the mask would report another loss."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, 5, 3)).astype("float32")
  x[:, 3:] = 0.0  # padding: masked
  y = rng.integers(0, 3, size=(24, 5))
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

  def model_fn():
    return keras.Sequential([keras.Input((5, 3)), keras.layers.Masking(),
                             keras.layers.Dense(3, activation="softmax")])
  by_loop = {
      loop: training_loops.train(
          model_fn, sgd(), losses.SparseCategoricalCrossentropy(), data,
          loop=loop, epochs=2, metrics=[accuracy()], validation_data=data,
          seed=0, verbose=0).history
      for loop in training_loops.LOOPS}
  fit = by_loop["keras_fit"]
  for loop, history in by_loop.items():
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
      np.testing.assert_allclose(history[key], fit[key], rtol=1e-5,
                                 err_msg=f"{loop} {key}")


def test_evaluate_matches_model_evaluate(histories):
  model = histories["graph"].model
  data = classification_data(examples=20, seed=1)
  ours = training_loops.evaluate(model, losses.SparseCategoricalCrossentropy(),
                                 data, metrics=[accuracy()])
  model.compile(loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=[accuracy()])
  theirs = model.evaluate(data, return_dict=True, verbose=0)
  assert sorted(ours) == sorted(theirs) == ["accuracy", "loss"]
  for key in ours:
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5)


def test_steps_use_training_flag():
  """Training updates BatchNorm's moving statistics (training=True);
  validation loss equals the model evaluated with training=False."""
  validation = classification_data(examples=20, seed=1)
  for loop in CUSTOM_LOOPS:
    history = run_loop(loop, epochs=1, validation_data=validation,
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
  whole_epoch = run_loop("graph", model_fn=classifier).history
  for kwargs in (dict(steps_per_loop=3), dict(jit_compile=True)):
    for key, values in run_loop("graph", model_fn=classifier,
                                **kwargs).history.items():
      np.testing.assert_allclose(values, whole_epoch[key], rtol=1e-4,
                                 err_msg=f"{kwargs} {key}")


@pytest.mark.parametrize("steps_per_loop", [None, 3])
def test_graph_loop_xla_chunks_match_the_graph_loop(monkeypatch,
                                                    steps_per_loop):
  """Static batch shapes: XLA runs chunks of 2 batches (6 an epoch; with
  steps_per_loop=3, calls of 2 + 1 steps, the 1 padded to a chunk)."""
  chunked = []
  monkeypatch.setattr(xla_chunks, "CHUNK_STEPS", 2)
  monkeypatch.setattr(xla_chunks, "train_in_chunks",
                      _recording(xla_chunks.train_in_chunks, chunked))
  data = classification_data(examples=48, batch_size=8, drop_remainder=True)
  reference = run_loop("graph", data=data, model_fn=classifier)
  fused = run_loop("graph", data=data, model_fn=classifier,
                   jit_compile=True, steps_per_loop=steps_per_loop)
  assert chunked, "the XLA chunk path was not taken"
  assert_same_run(fused, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("max_steps, stop_above, expected", [
    (4, None, (4, 6, 4)),    # the limit: the iterator stands after batch 3
    (99, None, (10, 45, 99)),  # the end of the data
    (99, 5, (4, 6, 4)),      # go_on false after batch 3: nothing more read
    (0, None, (0, 0, 0)),
])
def test_graph_loop_reads_exactly_the_batches_it_steps_on(max_steps,
                                                          stop_above,
                                                          expected):
  """`over_batches` fetches each batch after the step before, so the step
  sits in no `tf.cond`; it must still read no batch it does not train on."""
  iterator = iter(tf.data.Dataset.range(10))
  go_on = None if stop_above is None else (lambda total: total <= stop_above)

  @tf.function
  def run(max_steps):
    return graph_loops.over_batches(iterator, max_steps,
                                    lambda batch, total: total + batch,
                                    tf.constant(0, tf.int64), go_on)

  steps, total = run(tf.constant(max_steps))
  following = next(iterator, tf.constant(99, tf.int64))
  assert (int(steps), int(total), int(following)) == expected


def _recording(function, calls):
  def recorded(*args):
    calls.append(args)
    return function(*args)
  return recorded


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
  results = {loop: run_loop(loop, **kwargs)
             for loop in training_loops.LOOPS}
  assert sorted(results["graph"].history) == sorted(
      results["keras_fit"].history) == [
      "aux_loss", "learning_rate", "loss", "main_loss", "main_mae",
      "val_aux_loss",
      "val_loss", "val_main_loss", "val_main_mae"]
  for loop, history in results.items():
    assert_same_run(history, results["keras_fit"], rtol=1e-7)


@pytest.mark.parametrize("structure", ["dict", "list"])
def test_per_output_sample_weights_weigh_their_own_output_as_in_fit(
    structure):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(48, 4)).astype("float32")
  targets = [(x @ rng.normal(size=(4, 1))).astype("float32")
             for _ in range(2)]
  # Output a's weights are zero on half the examples: given to b too (the
  # bug this guards against), they would change b's loss as well.
  weights = [np.repeat([0.0, 2.0], 24).astype("float32"),
             rng.uniform(0.5, 1.5, size=48).astype("float32")]
  if structure == "dict":
    loss = {"a": losses.MeanSquaredError(), "b": losses.MeanSquaredError()}
    elements = (x, dict(zip("ab", targets)), dict(zip("ab", weights)))
    model_fn = two_regressions
  else:
    loss = [losses.MeanSquaredError(), losses.MeanSquaredError()]
    elements = (x, tuple(targets), tuple(weights))
    def model_fn():
      model = two_regressions()
      return keras.Model(model.inputs, [model.outputs[0], model.outputs[1]])
  data = tf.data.Dataset.from_tensor_slices(elements).batch(16)
  results = {loop: run_loop(loop, data=data, model_fn=model_fn, loss=loss,
                            metrics={}, optimizer_fn=sgd(0.01),
                            validation_data=data).history
             for loop in training_loops.LOOPS}
  for loop, history in results.items():
    for key, values in results["keras_fit"].items():
      np.testing.assert_allclose(history[key], values, rtol=1e-5,
                                 err_msg=f"{loop} {key}")
  unweighted = run_loop("graph", data=data.map(lambda x, y, w: (x, y)),
                        model_fn=model_fn, loss=loss, metrics={},
                        optimizer_fn=sgd(0.01)).history
  first, second = sorted(key for key in unweighted if key.endswith("_loss"))
  for key in (first, second):
    assert not np.allclose(results["graph"][key], unweighted[key]), key


def test_metrics_that_build_at_their_first_update_work_as_in_fit():
  """Keras' `F1Score` and `R2Score` create their state at their first
  update; the loops reset (and checkpoint) metrics before any."""
  data = classification_data(sample_weights=True).map(
      lambda x, y, w: (x, tf.one_hot(y, 3), w))
  def metrics():
    return [keras.metrics.F1Score(average="macro"), keras.metrics.R2Score()]
  results = {loop: run_loop(loop, data=data, metrics=metrics(),
                            loss=losses.CategoricalCrossentropy(),
                            validation_data=data).history
             for loop in training_loops.LOOPS}
  assert {"f1_score", "r2_score", "val_f1_score"} <= set(results["graph"])
  for loop, history in results.items():
    for key, values in results["keras_fit"].items():
      np.testing.assert_allclose(history[key], values, rtol=1e-5,
                                 err_msg=f"{loop} {key}")
  model = classifier()
  model.compile(loss="categorical_crossentropy", metrics=metrics())
  expected = model.evaluate(data, verbose=0, return_dict=True)
  ours = training_loops.evaluate(model, losses.CategoricalCrossentropy(),
                                 data, metrics=metrics())
  assert ours.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_allclose(ours[key], value, rtol=1e-5, err_msg=key)


# Output "b" of the two has no loss, so no gradient: as fit, Keras' optimizer
# says so.
@pytest.mark.filterwarnings("ignore:Gradients do not exist")
@pytest.mark.parametrize("outputs", ["two", "one"])
def test_a_loss_on_one_output_reports_as_fit(outputs):
  """A dict loss and metrics for output "a" alone: fit reports no
  per-output loss for a single loss, and prefixes metric names only when
  the model has several outputs; a plain tensor of targets serves the one
  model output."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(32, 4)).astype("float32")
  target = (x @ rng.normal(size=(4, 1))).astype("float32")
  if outputs == "two":
    model_fn, targets = two_regressions, {"a": target, "b": -target}
  else:
    def model_fn():
      inputs = keras.Input((4,))
      return keras.Model(inputs, layers.Dense(1, name="a")(inputs))
    targets = target
  data = tf.data.Dataset.from_tensor_slices((x, targets)).batch(8)
  results = {loop: run_loop(
      loop, data=data, model_fn=model_fn, optimizer_fn=sgd(0.01),
      loss={"a": losses.MeanSquaredError()}, validation_data=data,
      metrics={"a": [keras.metrics.MeanAbsoluteError(name="mae")]}).history
             for loop in training_loops.LOOPS}
  mae = "a_mae" if outputs == "two" else "mae"
  assert sorted(results["keras_fit"]) == sorted(
      ["learning_rate", "loss", mae, "val_loss", "val_" + mae])
  for loop, history in results.items():
    assert history.keys() == results["keras_fit"].keys(), loop
    for key, values in history.items():
      np.testing.assert_allclose(values, results["keras_fit"][key],
                                 rtol=1e-5, err_msg=f"{loop} {key}")


@pytest.mark.parametrize("structure", ["dict", "list"])
def test_one_loss_on_two_outputs_trains_each_as_fit(structure):
  """fit applies a single loss to every output and sums them, logging
  each as `<output>_loss`; the loops do the same, for a dict or a list of
  outputs, and `evaluate` too."""
  rng = np.random.default_rng(6)
  x = rng.normal(size=(32, 4)).astype("float32")
  target = (x @ rng.normal(size=(4, 1))).astype("float32")

  def model_fn():
    inputs = keras.Input((4,))
    a, b = layers.Dense(1, name="a")(inputs), layers.Dense(1, name="b")(inputs)
    return keras.Model(inputs, {"a": a, "b": b} if structure == "dict"
                       else [a, b])
  targets = ({"a": target, "b": -target} if structure == "dict"
             else (target, -target))
  data = tf.data.Dataset.from_tensor_slices((x, targets)).batch(8)
  results = {loop: run_loop(loop, data=data, model_fn=model_fn,
                            optimizer_fn=sgd(0.01),
                            loss=losses.MeanSquaredError(),
                            metrics=[], validation_data=data)
             for loop in training_loops.LOOPS}
  fit = results["keras_fit"].history
  assert sorted(fit) == sorted(["learning_rate", "loss", "a_loss", "b_loss",
                                "val_loss", "val_a_loss", "val_b_loss"])
  np.testing.assert_allclose(fit["loss"], np.add(fit["a_loss"],
                                                 fit["b_loss"]), rtol=1e-6)
  for loop, run in results.items():
    assert run.history.keys() == fit.keys(), loop
    for key, values in run.history.items():
      np.testing.assert_allclose(values, fit[key], rtol=1e-5,
                                 err_msg=f"{loop} {key}")
  model = results["graph"].model
  ours = training_loops.evaluate(model, losses.MeanSquaredError(), data)
  expected = model.evaluate(data, verbose=0, return_dict=True)
  assert ours.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_allclose(ours[key], value, rtol=1e-5, err_msg=key)


def _named_two_outputs(structure):
  """Outputs "b" (two units) then "a" (one): a list model's positions do
  not follow its names' order, so a name mapped to the wrong position
  shows (and the shapes differ)."""
  inputs = keras.Input((4,))
  b = layers.Dense(2, name="b")(inputs)
  a = layers.Dense(1, name="a")(inputs)
  return keras.Model(inputs, {"b": b, "a": a} if structure == "dict"
                     else [b, a])


def _mse_a_mae_b(by):
  losses_by_name = {"a": losses.MeanSquaredError(),
                    "b": keras.losses.MeanAbsoluteError()}
  return losses_by_name if by == "name" else [
      losses_by_name[name] for name in by]


@pytest.mark.parametrize("structure,loss_by,targets_by,metrics_by", [
    ("list", "name", "position", "name"),
    ("list", "name", "name", "position"),
    ("list", ("b", "a"), "name", "name"),
    ("dict", ("a", "b"), "name", "position"),
    ("dict", "name", "position", "name"),
])
def test_losses_metrics_and_targets_reach_outputs_by_name_or_position_as_fit(
    structure, loss_by, targets_by, metrics_by):
  """fit reaches a model's output by its name in a dict (of losses, loss
  weights, metrics, targets) and by its position in a list, whichever
  structure the model returns (a dict model's positions are its sorted
  names); the loops reach the same outputs, to the bit of fit's weights."""
  rng = np.random.default_rng(8)
  x = rng.normal(size=(32, 4)).astype("float32")
  target = {"a": (x @ rng.normal(size=(4, 1))).astype("float32"),
            "b": (x @ rng.normal(size=(4, 2))).astype("float32")}
  positions = _named_two_outputs(structure).output_names
  targets = (target if targets_by == "name"
             else tuple(target[name] for name in positions))
  data = tf.data.Dataset.from_tensor_slices((x, targets)).batch(8)
  metric = {"a": [keras.metrics.MeanAbsoluteError(name="mae")],
            "b": [keras.metrics.MeanSquaredError(name="mse")]}
  weights = {"a": 0.5, "b": 2.0}
  results = {loop: run_loop(
      loop, data=data, model_fn=lambda: _named_two_outputs(structure),
      optimizer_fn=sgd(0.01), loss=_mse_a_mae_b(loss_by),
      loss_weights=(weights if loss_by == "name"
                    else [weights[name] for name in loss_by]),
      metrics=(metric if metrics_by == "name"
               else [metric[name] for name in positions]),
      validation_data=data, epochs=1) for loop in ("graph", "keras_fit")}
  fit = results["keras_fit"]
  assert sorted(fit.history) == sorted(
      ["learning_rate", "loss", "a_loss", "b_loss", "a_mae", "b_mse",
       *(f"val_{key}" for key in ("loss", "a_loss", "b_loss", "a_mae",
                                  "b_mse"))])
  predictions = fit.model(x)
  if structure == "list":
    predictions = dict(zip(positions, predictions))
  np.testing.assert_allclose(  # a_loss is the MSE of "a" (before a step)
      fit.history["val_a_loss"][-1],
      np.mean((predictions["a"] - target["a"]) ** 2), rtol=1e-5)
  assert_same_run(results["graph"], fit, rtol=1e-6)


class _OneHead(keras.Model):
  """Subclassed, so its one output has no name."""

  def __init__(self):
    super().__init__(name="one_head")
    self.head = layers.Dense(1)

  def call(self, inputs):
    return self.head(inputs)


@pytest.mark.parametrize("metrics_by", ["name", "position", "subclassed"])
def test_metrics_keyed_to_a_single_output_model_report_as_fit(metrics_by):
  """fit takes metrics keyed by a one-output model's name (a dict), by
  position (a list of lists), or by any name where the model has none
  (subclassed), beside a single loss, as the model's metrics, named without
  a prefix (Keras' own compile and fit here); so do the loops, to fit's
  weights."""
  rng = np.random.default_rng(9)
  x = rng.normal(size=(32, 4)).astype("float32")
  y = (x @ rng.normal(size=(4, 1))).astype("float32")
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

  def model_fn():
    if metrics_by == "subclassed":
      return _OneHead()
    inputs = keras.Input((4,))
    return keras.Model(inputs, layers.Dense(1, name="out")(inputs))

  mae = [keras.metrics.MeanAbsoluteError(name="mae")]
  results = {loop: run_loop(
      loop, data=data, model_fn=model_fn, optimizer_fn=sgd(0.01),
      loss=losses.MeanSquaredError(),
      metrics=[mae] if metrics_by == "position" else {"out": mae},
      validation_data=data, epochs=1) for loop in ("eager", "graph",
                                                   "keras_fit")}
  keras.utils.set_random_seed(3)  # run_loop's seed: the same weights
  plain = model_fn()
  mae = [keras.metrics.MeanAbsoluteError(name="mae")]
  plain.compile(sgd(0.01)(), keras.losses.MeanSquaredError(),
                metrics=[mae] if metrics_by == "position" else {"out": mae})
  reference = plain.fit(data, validation_data=data, epochs=1, shuffle=False,
                        verbose=0).history
  assert sorted(reference) == ["loss", "mae", "val_loss", "val_mae"]
  for loop, run in results.items():
    assert sorted(run.history) == ["learning_rate", *sorted(reference)]
    for key, values in reference.items():
      np.testing.assert_allclose(run.history[key], values, rtol=1e-6,
                                 err_msg=f"{loop} {key}")
    for weight, expected in zip(run.model.get_weights(),
                                plain.get_weights()):
      np.testing.assert_allclose(weight, expected, rtol=1e-6, atol=1e-7)


class _TwoHeads(keras.Model):
  """Subclassed, so without output names: fit names its metrics by the
  keys of the predictions it returns."""

  def __init__(self):
    super().__init__(name="two_heads")
    self.a, self.b = layers.Dense(1), layers.Dense(1)

  def call(self, inputs):
    return {"a": self.a(inputs), "b": self.b(inputs)}


def test_a_subclassed_two_output_model_names_its_metrics_as_fit():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(32, 4)).astype("float32")
  target = (x @ rng.normal(size=(4, 1))).astype("float32")
  data = tf.data.Dataset.from_tensor_slices(
      (x, {"a": target, "b": -target})).batch(8)
  results = {loop: run_loop(
      loop, data=data, model_fn=_TwoHeads, optimizer_fn=sgd(0.01),
      loss={"a": losses.MeanSquaredError(), "b": losses.MeanSquaredError()},
      metrics={output: [keras.metrics.MeanAbsoluteError(name="mae")]
               for output in "ab"}).history
             for loop in training_loops.LOOPS}
  assert {"a_mae", "b_mae"} <= set(results["keras_fit"])
  for loop, history in results.items():
    assert history.keys() == results["keras_fit"].keys(), loop
    for key, values in history.items():
      np.testing.assert_allclose(values, results["keras_fit"][key],
                                 rtol=1e-5, err_msg=f"{loop} {key}")


class _OneHotAccuracy(keras.metrics.Metric):
  """Accuracy that first asserts its targets are one-hot rows."""

  def __init__(self, name="one_hot_accuracy", **kwargs):
    super().__init__(name=name, **kwargs)
    self.hits = self.add_variable(shape=(), initializer="zeros", name="hits")
    self.seen = self.add_variable(shape=(), initializer="zeros", name="seen")

  def update_state(self, y_true, y_pred, sample_weight=None):
    tf.debugging.assert_near(tf.reduce_sum(y_true, -1), 1.0,
                             message="targets are not one-hot")
    hits = tf.cast(tf.equal(tf.argmax(y_true, -1), tf.argmax(y_pred, -1)),
                   "float32")
    self.hits.assign_add(tf.reduce_sum(hits))
    self.seen.assign_add(tf.cast(tf.size(hits), "float32"))

  def result(self):
    return self.hits / self.seen


def test_a_metric_that_checks_its_targets_sees_only_real_batches():
  """Fit builds its metrics on symbolic tensors; an update on a made-up
  zero example would fail this metric's check before training."""
  data = classification_data().map(lambda x, y: (x, tf.one_hot(y, 3)))
  results = {loop: run_loop(loop, data=data, metrics=[_OneHotAccuracy()],
                            loss=losses.CategoricalCrossentropy()).history
             for loop in training_loops.LOOPS}
  for loop, history in results.items():
    np.testing.assert_allclose(history["one_hot_accuracy"],
                               results["keras_fit"]["one_hot_accuracy"],
                               rtol=1e-6, err_msg=loop)


def test_progress_bar_and_silence():
  for verbose, expect_output in ((1, True), (0, False)):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      run_loop("function", epochs=1, verbose=verbose)
    printed = out.getvalue()
    assert ("loss:" in printed and "accuracy:" in printed) == expect_output
    assert bool(printed) == expect_output


class _TwoStepsACall(training_loops.StepDriver):
  """A loop as BUILD.md's "Adding a loop" recipe writes one: two steps per
  `tf.function` call, the loop over them in Python."""

  steps_per_call = 2

  def __init__(self, trainer, options=training_loops.LoopOptions()):
    super().__init__(trainer, options)
    train_step = trainer.distribute(trainer.train_replica_step)
    self.eval_step = trainer.distribute(trainer.eval_replica_step)

    @tf.function
    def train_two(iterator, limit):
      steps, logs = tf.constant(0), {"loss": tf.constant(0.0)}
      for _ in tf.range(limit):
        batch = iterator.get_next_as_optional()
        if not batch.has_value():
          break
        logs = train_step(batch.get_value())
        steps += 1
      return steps, logs

    self.train_two = train_two

  def stepper(self, iterator):
    def run(limit):
      steps, logs = self.train_two(iterator, tf.constant(limit))
      return int(steps), logs
    return run

  def eval_stepper(self, iterator):
    def run():
      batches = [batch for _, batch in zip(range(self.steps_per_call),
                                           iterator)]
      logs = [self.eval_step(batch) for batch in batches]
      return len(batches), logs[-1] if logs else None
    return run


@pytest.fixture
def two_steps_a_call():
  """Registers the loop as the recipe does (`@drivers.register(name)` on
  the class), for this test only."""
  drivers.register("two_steps_a_call")(_TwoStepsACall)
  yield
  del drivers.DRIVERS["two_steps_a_call"]


def test_a_registered_loop_trains_through_train_and_matches_the_graph_loop(
    tmp_path, two_steps_a_call):
  """Through every piece the controller owns: validation, a callback, a
  checkpoint that a second call resumes from."""
  validation = classification_data(examples=20, seed=1)
  reference = run_loop("graph", epochs=3, validation_data=validation)
  run_loop("two_steps_a_call", epochs=2, validation_data=validation,
           checkpoint_dir=tmp_path)
  stopper = training_loops.EarlyStopping(patience=5)
  resumed = run_loop("two_steps_a_call", epochs=3,
                     validation_data=validation, checkpoint_dir=tmp_path,
                     callbacks=[stopper])
  assert resumed.epochs == [0, 1, 2] and stopper.best_epoch is not None
  assert_same_run(resumed, reference, rtol=1e-5, atol=1e-6)


def test_many_evaluations_trace_once_each_without_retracing_warnings(caplog):
  """A process that evaluates many models (the report, this suite) builds a
  driver each time, whose functions trace once each: TensorFlow, counting
  every function made from the same code together, warned after five of
  them that a function was retracing."""
  model = classifier(batch_norm=False)
  data = classification_data()
  drivers_made = []
  graph_driver = drivers.GraphDriver

  def recorded(*args, **kwargs):
    drivers_made.append(graph_driver(*args, **kwargs))
    return drivers_made[-1]
  with caplog.at_level(logging.WARNING, logger="tensorflow"):
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(drivers, "GraphDriver", recorded)
      for _ in range(7):
        training_loops.evaluate(model, losses.SparseCategoricalCrossentropy(),
                                data)
  assert len(drivers_made) == 7
  assert [driver.eval_steps.experimental_get_tracing_count()
          for driver in drivers_made] == [1] * 7
  assert "retracing" not in caplog.text


@pytest.mark.parametrize("loss", [
    [keras.losses.MeanAbsoluteError(), losses.MeanSquaredError()],
    {"main": losses.MeanSquaredError(),
     "aux": keras.losses.MeanAbsoluteError()},
    losses.MeanSquaredError()], ids=["list", "dict", "one"])
def test_a_dict_model_is_known_by_its_keys_not_its_layers_names(loss):
  """fit names a dict-output model's outputs by the dict's keys (sorted,
  for positions), whatever its output layers are called."""
  rng = np.random.default_rng(9)
  x = rng.normal(size=(32, 4)).astype("float32")
  targets = {"main": (x @ rng.normal(size=(4, 1))).astype("float32"),
             "aux": (x @ rng.normal(size=(4, 2))).astype("float32")}

  def model_fn():
    inputs = keras.Input((4,))
    return keras.Model(inputs, {
        "main": layers.Dense(1, name="dense_main")(inputs),
        "aux": layers.Dense(2, name="dense_aux")(inputs)})
  data = tf.data.Dataset.from_tensor_slices((x, targets)).batch(8)
  runs = {loop: run_loop(loop, epochs=1, data=data, model_fn=model_fn,
                         optimizer_fn=sgd(0.01), loss=loss, metrics=[])
          for loop in ("graph", "keras_fit")}
  assert sorted(runs["graph"].history) == [
      "aux_loss", "learning_rate", "loss", "main_loss"]
  assert_same_run(runs["graph"], runs["keras_fit"], rtol=1e-6)


def test_loss_weights_in_another_structure_than_the_losses_are_refused():
  """fit would pair a dict of weights with a list of losses by position
  (the dict's sorted keys against the list's order), not by output."""
  with pytest.raises(ValueError, match=r"^loss_weights is a dict but the "
                                       r"losses are a list: give the weights "
                                       r"in the losses' structure"):
    run_loop("graph", model_fn=two_regressions,
             loss=[losses.MeanSquaredError(), losses.MeanSquaredError()],
             loss_weights={"a": 0.5, "b": 2.0}, metrics=[])
