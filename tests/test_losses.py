"""Each loss against Keras' own, NumPy and finite differences, at ordinary
and extreme inputs, as a function, a `Loss` class and inside `model.fit`."""

import inspect
import io
import re
import tokenize

import keras
import numpy as np
import pytest
import tensorflow as tf

import layers
import losses
from conftest import saved_and_loaded

RTOL = 1e-6


def _probs(rng, shape):
  logits = rng.normal(size=shape).astype("float32")
  return (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(
      "float32")


def _numpy_log_softmax(logits):
  logits = logits.astype("float64")
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _value_and_grad(fn, y_true, y_pred):
  y_pred = tf.convert_to_tensor(y_pred)
  with tf.GradientTape() as tape:
    tape.watch(y_pred)
    value = fn(y_true, y_pred)
  return value.numpy(), tape.gradient(value, y_pred).numpy()


def _cases(rng):
  """(ours, keras', y_true, y_pred) for each function, ordinary inputs."""
  labels = rng.integers(0, 5, size=(6,))
  one_hot = np.eye(5, dtype="float32")[labels]
  logits = rng.normal(size=(6, 5)).astype("float32") * 3
  binary = rng.integers(0, 2, size=(6, 4)).astype("float32")
  return {
      "mse": (losses.mean_squared_error, keras.losses.mean_squared_error,
              rng.normal(size=(6, 3)).astype("float32"),
              rng.normal(size=(6, 3)).astype("float32")),
      "sparse_probs": (losses.sparse_categorical_crossentropy,
                       keras.losses.sparse_categorical_crossentropy, labels,
                       _probs(rng, (6, 5))),
      "sparse_logits": (
          lambda t, p: losses.sparse_categorical_crossentropy(t, p, True),
          lambda t, p: keras.losses.sparse_categorical_crossentropy(
              t, p, from_logits=True), labels, logits),
      "categorical_probs": (losses.categorical_crossentropy,
                            keras.losses.categorical_crossentropy, one_hot,
                            _probs(rng, (6, 5))),
      "categorical_logits_smoothed": (
          lambda t, p: losses.categorical_crossentropy(t, p, True, 0.1),
          lambda t, p: keras.losses.categorical_crossentropy(
              t, p, from_logits=True, label_smoothing=0.1), one_hot, logits),
      "binary_probs": (losses.binary_crossentropy,
                       keras.losses.binary_crossentropy, binary,
                       rng.uniform(0.01, 0.99, size=(6, 4)).astype("float32")),
      "binary_logits": (
          lambda t, p: losses.binary_crossentropy(t, p, from_logits=True),
          lambda t, p: keras.losses.binary_crossentropy(t, p,
                                                        from_logits=True),
          binary, rng.normal(size=(6, 4)).astype("float32") * 3),
  }


@pytest.mark.parametrize("case", ["mse", "sparse_probs", "sparse_logits",
                                  "categorical_probs",
                                  "categorical_logits_smoothed",
                                  "binary_probs", "binary_logits"])
def test_functions_match_keras_values_and_gradients(rng, case):
  ours, theirs, y_true, y_pred = _cases(rng)[case]
  value, grad = _value_and_grad(ours, y_true, y_pred)
  keras_value, keras_grad = _value_and_grad(theirs, y_true, y_pred)
  assert value.shape == (6,)
  np.testing.assert_allclose(value, keras_value, rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(grad, keras_grad, rtol=1e-5, atol=1e-7)


def test_functions_match_numpy(rng):
  cases = _cases(rng)
  _, _, labels, logits = cases["sparse_logits"]
  expected = -_numpy_log_softmax(logits)[np.arange(6), labels]
  np.testing.assert_allclose(
      losses.sparse_categorical_crossentropy(labels, logits, True), expected,
      rtol=1e-5)
  _, _, y_true, y_pred = cases["mse"]
  np.testing.assert_allclose(losses.mean_squared_error(y_true, y_pred),
                             ((y_true - y_pred) ** 2).mean(-1), rtol=1e-6)
  _, _, z, x = cases["binary_logits"]
  p = 1 / (1 + np.exp(-x.astype("float64")))
  np.testing.assert_allclose(
      losses.binary_crossentropy(z, x, from_logits=True),
      -(z * np.log(p) + (1 - z) * np.log(1 - p)).mean(-1), rtol=1e-5)


def test_gradient_matches_finite_differences(rng):
  labels = np.array([2, 0])
  logits = rng.normal(size=(2, 4))
  _, grad = _value_and_grad(
      lambda t, p: tf.reduce_sum(
          losses.sparse_categorical_crossentropy(t, p, True)),
      labels, logits)  # float64 end to end
  step, numeric = 1e-6, np.zeros_like(logits)
  for index in np.ndindex(logits.shape):
    bump = np.zeros_like(logits)
    bump[index] = step
    loss = lambda l: -_numpy_log_softmax(l)[np.arange(2), labels].sum()
    numeric[index] = (loss(logits + bump) - loss(logits - bump)) / (2 * step)
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("ours,theirs,target", [
    (lambda t, p: losses.sparse_categorical_crossentropy(t, p, True),
     lambda t, p: keras.losses.sparse_categorical_crossentropy(
         t, p, from_logits=True), np.array([0, 1, 2])),
    (lambda t, p: losses.categorical_crossentropy(t, p, True),
     lambda t, p: keras.losses.categorical_crossentropy(t, p,
                                                        from_logits=True),
     np.eye(3, dtype="float32")),
    (lambda t, p: losses.binary_crossentropy(t, p, True),
     lambda t, p: keras.losses.binary_crossentropy(t, p, from_logits=True),
     np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]], "float32"))])
def test_huge_logits_stay_finite_and_match_keras(ours, theirs, target):
  logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3], [1e4, 1e4, -1e4]],
                    "float32")
  value, grad = _value_and_grad(ours, target, logits)
  keras_value, keras_grad = _value_and_grad(theirs, target, logits)
  assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(value, keras_value, rtol=RTOL)
  np.testing.assert_allclose(grad, keras_grad, rtol=1e-5, atol=1e-7)


def test_softmax_output_uses_the_logits_behind_it():
  # A saturated softmax: class 2 has probability 0 in float32, so only the
  # logits behind the softmax give the true loss, 200 + logsumexp = 400.
  model = keras.Sequential([keras.Input((2,)), layers.Dense(3, "softmax")])
  model.layers[0].kernel.assign([[200.0, 0.0, -200.0], [0.0, 0.0, 0.0]])
  x, labels = np.array([[1.0, -1.0]], "float32"), tf.constant([2])
  eager = losses.sparse_categorical_crossentropy(labels, model(x))
  graph = tf.function(
      lambda: losses.sparse_categorical_crossentropy(labels, model(x)))()
  np.testing.assert_allclose(eager, [400.0], rtol=1e-6)
  np.testing.assert_allclose(graph, [400.0], rtol=1e-6)
  np.testing.assert_allclose(
      eager, keras.losses.sparse_categorical_crossentropy(labels, model(x)),
      rtol=RTOL)


def test_sparse_gradient_with_an_unknown_class_count_in_a_graph(rng):
  """A graph traced for any number of classes: the closed-form gradient
  takes the count from the logits at run time."""
  labels = np.array([2, 0])
  logits = rng.normal(size=(2, 4)).astype("float32")

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int64),
                                tf.TensorSpec([None, None], tf.float32)])
  def gradient(labels, logits):
    with tf.GradientTape() as tape:
      tape.watch(logits)
      loss = tf.reduce_sum(
          losses.sparse_categorical_crossentropy(labels, logits, True))
    return tape.gradient(loss, logits)
  softmax = np.exp(_numpy_log_softmax(logits.astype("float64")))
  np.testing.assert_allclose(gradient(labels, logits),
                             softmax - np.eye(4)[labels], rtol=1e-5,
                             atol=1e-7)


def test_sparse_labels_out_of_range_are_a_clear_error():
  probs = np.full((3, 4), 0.25, "float32")
  with pytest.raises(ValueError, match=r"labels must be integers in \[0, 4\)"
                     r".*e\.g\. \[-1, 4\]"):
    losses.sparse_categorical_crossentropy(np.array([4, -1, 0]), probs)
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    losses.SparseCategoricalCrossentropy()(np.array([1.5, 0, 0]), probs)
  with pytest.raises(ValueError, match="labels must have shape"):
    losses.sparse_categorical_crossentropy(np.array([1, 2]), probs)


def test_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match="same shape"):
    losses.categorical_crossentropy(np.ones((2, 3)), np.ones((2, 4)))
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.categorical_crossentropy(np.ones((2, 3)), np.ones((2, 3)),
                                    label_smoothing=2.0)


CLASS_PAIRS = [
    (losses.MeanSquaredError(), keras.losses.MeanSquaredError(), "mse"),
    (losses.SparseCategoricalCrossentropy(),
     keras.losses.SparseCategoricalCrossentropy(), "sparse_probs"),
    (losses.SparseCategoricalCrossentropy(from_logits=True),
     keras.losses.SparseCategoricalCrossentropy(from_logits=True),
     "sparse_logits"),
    (losses.CategoricalCrossentropy(), keras.losses.CategoricalCrossentropy(),
     "categorical_probs"),
    (losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
     keras.losses.CategoricalCrossentropy(from_logits=True,
                                          label_smoothing=0.1),
     "categorical_logits_smoothed"),
    (losses.BinaryCrossentropy(), keras.losses.BinaryCrossentropy(),
     "binary_probs"),
    (losses.BinaryCrossentropy(from_logits=True),
     keras.losses.BinaryCrossentropy(from_logits=True), "binary_logits")]


@pytest.mark.parametrize("ours,theirs,case", CLASS_PAIRS)
def test_classes_reduce_and_weight_like_keras(rng, ours, theirs, case):
  _, _, y_true, y_pred = _cases(rng)[case]
  weights = rng.uniform(0, 2, size=(6,)).astype("float32")
  np.testing.assert_allclose(ours(y_true, y_pred), theirs(y_true, y_pred),
                             rtol=RTOL)
  np.testing.assert_allclose(ours(y_true, y_pred, sample_weight=weights),
                             theirs(y_true, y_pred, sample_weight=weights),
                             rtol=RTOL)
  per_example = type(ours).per_example(y_true, y_pred, **ours._options)
  np.testing.assert_allclose(ours(y_true, y_pred, sample_weight=weights),
                             np.mean(per_example.numpy() * weights),
                             rtol=1e-5)
  assert type(ours).from_config(ours.get_config()).get_config() == (
      ours.get_config())


HALF = (tf.float16, tf.bfloat16)


@pytest.mark.parametrize("half", HALF, ids=lambda d: d.name)
@pytest.mark.parametrize("case", ["mse", "sparse_probs", "sparse_logits",
                                  "categorical_probs",
                                  "categorical_logits_smoothed",
                                  "binary_probs", "binary_logits"])
def test_functions_compute_half_precision_predictions_in_float32(rng, case,
                                                                 half):
  ours, theirs, y_true, y_pred = _cases(rng)[case]
  y_pred = tf.cast(y_pred, half)
  value = ours(y_true, y_pred)
  assert value.dtype == tf.float32
  np.testing.assert_allclose(value, theirs(y_true, tf.cast(y_pred, "float32")),
                             rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("half", HALF, ids=lambda d: d.name)
@pytest.mark.parametrize("ours,theirs,case", CLASS_PAIRS)
def test_classes_compute_half_precision_predictions_in_float32(
    rng, ours, theirs, case, half):
  _, _, y_true, y_pred = _cases(rng)[case]
  y_pred = tf.cast(y_pred, half)
  value = ours(y_true, y_pred)
  assert value.dtype == tf.float32
  np.testing.assert_allclose(value, theirs(y_true, y_pred), rtol=RTOL)


def test_float16_softmax_output_uses_its_logits_in_float32():
  # As test_softmax_output_uses_the_logits_behind_it, from a mixed precision
  # layer: float16 holds the logits exactly, not the loss's digits.
  model = keras.Sequential([keras.Input((2,)),
                            layers.Dense(3, "softmax", dtype="mixed_float16")])
  model.layers[0].kernel.assign([[200.0, 0.0, -200.0], [0.0, 0.0, 0.0]])
  x, labels = np.array([[1.0, -1.0]], "float32"), tf.constant([2])
  assert model(x).dtype == tf.float16
  loss = lambda: losses.sparse_categorical_crossentropy(labels, model(x))
  for value in (loss(), tf.function(loss)()):
    assert value.dtype == tf.float32
    np.testing.assert_allclose(value, [400.0], rtol=1e-6)


def test_mse_aligns_a_trailing_unit_axis_like_keras(rng):
  y_true = rng.normal(size=(5,)).astype("float32")
  y_pred = rng.normal(size=(5, 1)).astype("float32")
  np.testing.assert_allclose(losses.MeanSquaredError()(y_true, y_pred),
                             keras.losses.MeanSquaredError()(y_true, y_pred),
                             rtol=RTOL)


def test_compiled_model_trains_like_keras_and_saves(rng, tmp_path):
  x = rng.normal(size=(32, 4)).astype("float32")
  y = rng.integers(0, 3, size=(32,))

  def fitted(loss):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3, "softmax")])
    model.compile(keras.optimizers.SGD(0.1), loss)
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                        verbose=0)
    return model, history.history["loss"]

  model, ours = fitted(losses.SparseCategoricalCrossentropy())
  _, theirs = fitted(keras.losses.SparseCategoricalCrossentropy())
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)
  loaded = saved_and_loaded(model, tmp_path)
  assert isinstance(loaded.loss, losses.SparseCategoricalCrossentropy)
  np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0),
                             model.evaluate(x, y, verbose=0), rtol=1e-6)


# -------------------------------------- BUILD.md's "Adding a loss" recipe

# Public functions of losses/functions.py that are helpers, not losses.
_HELPERS = {"log_softmax", "align_ranks"}


def _per_example_functions():
  from losses import functions
  found = {name: value for name, value in vars(functions).items()
           if inspect.isfunction(value)
           and value.__module__ == functions.__name__
           and not name.startswith("_")}
  assert _HELPERS <= set(found), "a helper named here is gone"
  return {name: fn for name, fn in found.items() if name not in _HELPERS}


def _loss_classes():
  """The `Loss` classes exported from losses/__init__.py or public in
  losses/classes.py."""
  from losses import classes
  names = getattr(losses, "__all__", [n for n in vars(losses)
                                      if not n.startswith("_")])
  candidates = [getattr(losses, name) for name in names] + [
      value for name, value in vars(classes).items()
      if not name.startswith("_")
      and getattr(value, "__module__", None) == classes.__name__]
  return {value for value in candidates if isinstance(value, type)
          and issubclass(value, keras.losses.Loss)}


def _parametrized(test, argnames):
  """The argument values `test` is parametrized with for `argnames`."""
  for mark in test.pytestmark:
    if mark.name == "parametrize" and mark.args[0] == argnames:
      return list(mark.args[1])
  raise AssertionError(f"{test.__name__} is not parametrized by {argnames}")


def test_every_loss_follows_the_recipe():
  """BUILD.md's "Adding a loss" on every per-example function of
  losses/functions.py and every `Loss` class the package has.

  Step 2: a `_PerExampleLoss` subclass in losses/classes.py names each
  function. Step 3: each class is in CLASS_PAIRS (values, weighting and
  config against Keras' class), and its function is, by itself, one of the
  cases of test_functions_match_keras_values_and_gradients (values and
  gradients against Keras' function).
  """
  from losses import classes
  functions = _per_example_functions()
  assert functions
  loss_classes = _loss_classes()
  for name, function in functions.items():
    naming = [cls for cls in loss_classes
              if getattr(cls, "per_example", None) is function]
    assert naming, f"no Loss class in losses/classes.py names {name}"
    for cls in naming:
      assert issubclass(cls, classes._PerExampleLoss), (
          f"{cls.__name__} names {name} but is no _PerExampleLoss")
      assert cls.__module__ == classes.__name__, (
          f"{cls.__name__} is not in losses/classes.py")
  function_cases = _parametrized(
      test_functions_match_keras_values_and_gradients, "case")
  cases = _cases(np.random.default_rng(0))
  assert set(cases) == set(function_cases), "a case in _cases is not tested"
  compared_classes = {type(ours) for ours, _, _ in _parametrized(
      test_classes_reduce_and_weight_like_keras, "ours,theirs,case")}
  for cls in loss_classes:
    assert cls in compared_classes, (
        f"{cls.__name__} is not in test_classes_reduce_and_weight_like_keras'"
        f" CLASS_PAIRS")
    assert any(cases[case][0] is cls.per_example for case in function_cases), (
        f"{cls.__name__}.per_example is no case of "
        f"test_functions_match_keras_values_and_gradients")


def _code_only(source):
  """`source` without its comments and strings (docstrings included)."""
  return " ".join(
      token.string for token in tokenize.generate_tokens(
          io.StringIO(source).readline)
      if token.type not in (tokenize.COMMENT, tokenize.STRING))


def test_loss_functions_use_no_keras_losses_nor_tf_cross_entropy():
  """Step 1: the per-example functions are built from TensorFlow ops, not on
  keras.losses or tf.nn's cross-entropies (read from the source)."""
  from losses import functions
  code = _code_only(inspect.getsource(functions))
  forbidden = {
      "keras.losses": r"\bkeras\s*(\.\s*\w+\s*)*\.\s*losses\b",
      "from keras import losses":
          r"\bfrom\s+keras[\w\s.]*?\bimport\s+\(?[\w\s,]*\blosses\b",
      "tf.nn.*cross_entropy*": r"\bnn\s*\.\s*\w*cross_entropy",
      "from tensorflow.nn import *cross_entropy*":
          r"\bfrom\s+tensorflow[\w\s.]*?\bimport\s+\(?[\w\s,]*cross_entropy",
  }
  for what, pattern in forbidden.items():
    match = re.search(pattern, code)
    assert match is None, f"losses/functions.py uses {what}: {match[0]!r}"
