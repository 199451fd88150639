"""Each layer against Keras' own layer with the same weights, NumPy and
scikit-learn; plus tf.function, Sequential/functional use and .keras files.

`layer_harness` runs the checks every layer gets (build, config, bad
arguments, .keras file, tf.function, Keras' layer) on the `SPECS` below; the
tests after it check what is particular to one layer.
"""

import importlib
import inspect
import itertools
import pkgutil

import keras
import ml_dtypes
import numpy as np
import pytest
import sklearn.preprocessing
import tensorflow as tf

import layers
from conftest import saved_and_loaded
from layer_harness import (LayerSpec, Misuse, check_layer,
                           check_mixed_precision, global_dtype_policy)


def _dense(shape, **kwargs):
  features = shape[-1]
  weight_shapes = {"kernel": (features, kwargs["units"])}
  if kwargs.get("use_bias", True):
    weight_shapes["bias"] = (kwargs["units"],)
  return LayerSpec(
      layers.Dense, kwargs, shape, weight_shapes,
      misuses=(Misuse({"units": 0}, "positive int"),
               Misuse({}, "rank >= 2", input_shape=(4,))),
      reference=keras.layers.Dense, output_tol=(1e-6, 1e-6),
      gradient_tol=(1e-5, 1e-6))


def _batch_norm(shape, **kwargs):
  features = (shape[kwargs.get("axis", -1)],)
  names = (["gamma"] * kwargs.get("scale", True)
           + ["beta"] * kwargs.get("center", True)
           + ["moving_mean", "moving_variance"])
  return LayerSpec(
      layers.BatchNormalization, kwargs, shape,
      {name: features for name in names},
      # Moves the moving statistics off their defaults before saving.
      prepare=lambda layer, x: layer(x, training=True),
      misuses=(Misuse({"momentum": 1.5}, "momentum must be in"),
               Misuse({"epsilon": 0.0}, "epsilon must be positive"),
               Misuse({"synchronized": 1}, "synchronized must be True or"),
               Misuse({"axis": 3}, "axis 3 is out of range",
                      input_shape=(2, 3))),
      reference=keras.layers.BatchNormalization,
      # Positive (moving variance) and away from the defaults 0 and 1.
      reference_weights=lambda rng, shape: (
          rng.normal(size=shape).astype("float32") + 1.5),
      training=(True, False), steps=4, output_tol=(1e-5, 1e-5),
      weight_tol=(1e-6, 1e-6), gradient_tol=(1e-4, 1e-5))


_BAD_RATES = tuple(
    Misuse({"rate": rate}, r"rate must be a number in \[0, 1\)")
    for rate in (-0.1, 1.0, 1.5, "0.5", True))


def _dropout(cls, reference, **kwargs):
  # Keras draws other masks, so only the identity outside training compares.
  return LayerSpec(cls, kwargs, (5, 4), misuses=_BAD_RATES,
                   reference=reference, training=(None, False))


def _scaler(cls):
  return LayerSpec(
      cls, {}, (6, 3), {"offset": (3,), "scale": (3,)},
      prepare=lambda layer, x: layer.adapt(x * 3 + 7),
      misuses=(Misuse({}, r"expects inputs \[\.\.\., features\]",
                      input_shape=(4,)),))


SPECS = [
    _dense((5, 4), units=3, activation=None, use_bias=True),
    _dense((2, 3, 4), units=3, activation="relu", use_bias=True),
    _dense((5, 4), units=3, activation="tanh", use_bias=False),
    _dense((5, 4), units=3, activation="softmax", use_bias=True),
    _dense((5, 4), units=3, activation="relu", use_bias=False,
           kernel_initializer="he_normal"),
    *(_batch_norm(shape, axis=axis, momentum=0.9, synchronized=synchronized)
      for axis, shape in [(-1, (8, 3)), (1, (4, 3, 5)), (-1, (4, 2, 3))]
      for synchronized in (False, True)),
    _batch_norm((4, 3, 5), axis=1, momentum=0.9, epsilon=1e-4, center=False),
    _batch_norm((6, 4), scale=False, center=False),
    _dropout(layers.Dropout, keras.layers.Dropout, rate=0.3, seed=4),
    _dropout(layers.AlphaDropout, keras.layers.AlphaDropout, rate=0.1,
             seed=2),
    LayerSpec(
        layers.WideDeepMerge, {}, [(4, 5), (4, 3)],
        misuses=(Misuse({}, "exactly two inputs", input_shape=[(2, 3)] * 3),
                 Misuse({}, "deep input must have rank 2",
                        input_shape=[(2, 3), (2, 3, 1)]),
                 Misuse({}, "batch sizes differ",
                        input_shape=[(2, 3), (4, 3)])),
        reference=keras.layers.Concatenate),
    _scaler(layers.Standardize),
    _scaler(layers.MinMaxScale),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_layer(spec, tmp_path):
  check_layer(spec, tmp_path)


MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")


@pytest.mark.parametrize("policy", MIXED_POLICIES)
@pytest.mark.parametrize("spec", [spec for spec in SPECS if spec.reference],
                         ids=str)
def test_layer_under_mixed_precision(spec, policy):
  check_mixed_precision(spec, policy)


# ------------------------------------- BUILD.md's "Adding a layer" recipe


def _layer_classes(namespace):
  return {name: value for name, value in namespace.items()
          if isinstance(value, type) and issubclass(value, keras.layers.Layer)}


EXPORTED_LAYERS = sorted(
    _layer_classes({name: getattr(layers, name) for name in getattr(
        layers, "__all__", [n for n in vars(layers) if not n.startswith("_")])
                    }).values(), key=lambda cls: cls.__name__)
_OWN_MODULES = [importlib.import_module(f"layers.{info.name}")
                for info in pkgutil.iter_modules(layers.__path__)]


def _arguments(init):
  """`init`'s named parameters (not `self`, `*args`, `**kwargs`)."""
  return {name: parameter.default for name, parameter in
          inspect.signature(init).parameters.items()
          if name != "self" and parameter.kind not in (
              parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)}


def test_every_layer_of_the_package_is_exported():
  """Step 4, so that the recipe test below sees every layer: each layer a
  module of layers/ defines is exported from layers/__init__.py, unless it is
  private (`_FeatureScaler`) or the base of exported ones (`RandomDrop`)."""
  assert EXPORTED_LAYERS
  for module in _OWN_MODULES:
    for name, cls in _layer_classes(vars(module)).items():
      if cls.__module__ != module.__name__ or name.startswith("_"):
        continue
      assert cls in EXPORTED_LAYERS or any(
          issubclass(exported, cls) for exported in EXPORTED_LAYERS), (
              f"{module.__name__}.{name} is not exported from layers")


@pytest.mark.parametrize("cls", EXPORTED_LAYERS, ids=lambda cls: cls.__name__)
def test_every_layer_follows_the_recipe(cls):
  """BUILD.md's "Adding a layer", step by step, on each exported layer.

  Step 1's module rule as the package follows it: each exported layer is
  defined in a module `layers.<name>` of its own, except that one module may
  hold a family of exported layers over a private base of that module
  (feature_scaling.py: Standardize and MinMaxScale on `_FeatureScaler`).
  Private helpers and non-exported bases beside a layer are fine.
  """
  name = cls.__name__
  # 1. Its own module of layers/.
  package, _, module_name = cls.__module__.partition(".")
  assert package == "layers" and module_name and "." not in module_name, (
      f"{name} is defined in {cls.__module__}, not in a module layers.<name>")
  module = importlib.import_module(cls.__module__)
  assert vars(module).get(name) is cls
  siblings = [other for other in EXPORTED_LAYERS
              if other.__module__ == cls.__module__]
  if len(siblings) > 1:
    family_bases = [
        base for base_name, base in _layer_classes(vars(module)).items()
        if base_name.startswith("_") and base.__module__ == cls.__module__
        and all(issubclass(sibling, base) for sibling in siblings)]
    assert family_bases, (
        f"{cls.__module__} holds several exported layers "
        f"{[s.__name__ for s in siblings]} that share no private base of it")
  # 1. Registered serializable under package "layers".
  registered = keras.saving.get_registered_name(cls)
  assert registered.startswith("layers>"), (
      f"{name} is not registered under package 'layers': {registered!r}")
  assert keras.saving.get_registered_object(registered) is cls
  # 5. A LayerSpec in SPECS, so test_layer runs the harness on it.
  specs = [spec for spec in SPECS if spec.cls is cls]
  assert specs, f"{name} has no LayerSpec in SPECS"
  arguments = _arguments(cls.__init__)
  own_arguments = set(arguments) - set(_arguments(keras.layers.Layer.__init__))
  for spec in specs:
    # 2. Every weight is created in build, none in the constructor.
    assert spec.make().weights == [], f"{spec}: weights before build"
    # 2. Bad constructor arguments: a ValueError naming the argument.
    for misuse in spec.misuses:
      if misuse.input_shape is None:
        with pytest.raises(ValueError) as refused:
          spec.make(**misuse.kwargs)
        for argument in misuse.kwargs:
          assert argument in str(refused.value), (
              f"{spec}: {refused.value} does not name {argument}")
  if own_arguments:
    assert any(misuse.input_shape is None
               for spec in specs for misuse in spec.misuses), (
                   f"{name}: no Misuse of its arguments {own_arguments}")
  # 3. get_config returns every constructor argument, and what it returns
  # builds the same layer.
  configs = [spec.make().get_config() for spec in specs]
  for spec, config in zip(specs, configs):
    missing = set(arguments) - set(config)
    assert not missing, f"{spec}: get_config misses {sorted(missing)}"
    assert cls.from_config(config).get_config() == config
  # ... the argument's value, not a constant: two specs whose arguments
  # differ have configs that differ there.
  for (a, config_a), (b, config_b) in itertools.combinations(
      zip(specs, configs), 2):
    for argument, default in arguments.items():
      if a.kwargs.get(argument, default) != b.kwargs.get(argument, default):
        assert config_a[argument] != config_b[argument], (
            f"get_config's {argument!r} is {config_a[argument]!r} for both "
            f"{a} and {b}")


# ---------------------------------------------------------------- Dense


def test_dense_against_numpy(rng):
  x = rng.normal(size=(5, 4)).astype("float32")
  dense = layers.Dense(3)
  dense.build(x.shape)
  dense.bias.assign(rng.normal(size=3).astype("float32"))
  np.testing.assert_allclose(dense(x), x @ dense.kernel.numpy()
                             + dense.bias.numpy(), rtol=1e-5, atol=1e-6)


def test_dense_in_sequential_and_functional_models(rng, tmp_path):
  x = rng.normal(size=(6, 4)).astype("float32")
  sequential = keras.Sequential([keras.Input((4,)), layers.Dense(5, "relu"),
                                 layers.Dense(2)])
  inputs = keras.Input((4,))
  functional = keras.Model(inputs, layers.Dense(2)(layers.Dense(5, "relu")(
      inputs)))
  functional.set_weights(sequential.get_weights())
  expected = sequential(x)
  np.testing.assert_allclose(functional(x), expected, rtol=1e-6)
  np.testing.assert_allclose(tf.function(sequential)(x), expected, rtol=1e-6)
  np.testing.assert_allclose(saved_and_loaded(sequential, tmp_path)(x),
                             expected, rtol=1e-6)


# ---------------------------------------------------- BatchNormalization


def test_batch_normalization_against_numpy(rng):
  x = (rng.normal(size=(16, 3)) * 5 + 100).astype("float32")
  layer = layers.BatchNormalization(momentum=0.5)
  out = layer(x, training=True).numpy()
  mean, var = x.mean(0), x.var(0)
  np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-3),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(layer.moving_mean, 0.5 * mean, rtol=1e-6)
  np.testing.assert_allclose(layer.moving_variance, 0.5 + 0.5 * var,
                             rtol=1e-5)
  layer.trainable = False  # a frozen layer runs in inference mode (Keras).
  np.testing.assert_allclose(layer(x, training=True),
                             layer(x, training=False))


@pytest.mark.parametrize("axis, shape", [(-1, (16, 3)), (1, (4, 3, 5))])
def test_batch_normalization_second_derivatives_match_keras(rng, axis,
                                                            shape):
  """Its closed-form gradient is differentiable again, through the batch
  statistics, as Keras' differentiated ops are: a gradient penalty (the
  gradient of the squared input gradient) on Keras' layer and ours."""
  x = tf.constant((rng.normal(size=shape) * 3 + 1).astype("float32"))
  upstream = tf.constant(rng.normal(size=shape).astype("float32"))
  weights = [rng.normal(size=shape[axis]).astype("float32") + 1.5
             for _ in range(4)]
  results = []
  for layer in (layers.BatchNormalization(axis=axis),
                keras.layers.BatchNormalization(axis=axis)):
    layer.build(shape)
    layer.set_weights(weights)
    with tf.GradientTape() as outer:
      outer.watch(x)
      with tf.GradientTape() as inner:
        inner.watch(x)
        loss = tf.reduce_sum(tf.sin(layer(x, training=True)) * upstream)
      penalty = tf.reduce_sum(tf.square(inner.gradient(loss, x)))
    results.append(outer.gradient(penalty, [x, *layer.trainable_variables]))
  for ours, theirs in zip(*results):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axis, shape", [(-1, (8, 3)), (1, (4, 3, 5))])
def test_batch_normalization_hessian_vector_products_are_exact(rng, axis,
                                                               shape):
  """Against the textbook formula differentiated twice in float64 (Keras'
  layer cuts the gradient through the mean inside its variance, so its
  Hessian-vector products along most directions are not these)."""
  x = (rng.normal(size=shape) * 3 + 1).astype("float32")
  upstream, direction = (rng.normal(size=shape).astype("float32")
                         for _ in range(2))
  layer = layers.BatchNormalization(axis=axis)
  layer.build(shape)
  layer.set_weights([rng.normal(size=shape[axis]).astype("float32") + 1.5
                     for _ in range(4)])
  broadcast = [1] * len(shape)
  broadcast[axis] = -1
  gamma, beta = (tf.reshape(tf.cast(weight, tf.float64), broadcast)
                 for weight in (layer.gamma, layer.beta))

  def textbook(x):
    axes = [i for i in range(len(shape)) if i != axis % len(shape)]
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - mean), axes, keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + 1e-3) * gamma + beta

  def hessian_vector_product(normalize, x, dtype):
    x = tf.constant(x, dtype)
    with tf.GradientTape() as outer:
      outer.watch(x)
      with tf.GradientTape() as inner:
        inner.watch(x)
        loss = tf.reduce_sum(tf.sin(normalize(x)) * tf.cast(upstream, dtype))
      along = tf.reduce_sum(inner.gradient(loss, x) * tf.cast(direction,
                                                              dtype))
    return outer.gradient(along, x).numpy()

  expected = hessian_vector_product(textbook, x, tf.float64)
  ours = hessian_vector_product(lambda x: layer(x, training=True), x,
                                tf.float32)
  np.testing.assert_allclose(ours, expected, rtol=1e-4,
                             atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------- Dropout


def test_dropout_is_inverted_dropout(rng):
  x = rng.normal(size=(200, 50)).astype("float32") + 3.0
  layer = layers.Dropout(0.3, seed=1)
  np.testing.assert_array_equal(layer(x), x)
  np.testing.assert_array_equal(layer(x, training=False), x)
  out = layer(x, training=True).numpy()
  dropped = out == 0
  np.testing.assert_allclose(out[~dropped], x[~dropped] / 0.7, rtol=1e-6)
  assert abs(dropped.mean() - 0.3) < 0.02  # 10,000 Bernoulli(0.3) draws
  assert abs(out.mean() - x.mean()) < 0.05
  # Each call draws a new mask; the same seed repeats the sequence.
  assert not np.array_equal(dropped, layer(x, training=True).numpy() == 0)
  replay = layers.Dropout(0.3, seed=1)
  np.testing.assert_array_equal(replay(x, training=True), out)


def test_dropout_draws_new_masks_inside_tf_function(rng):
  layer = layers.Dropout(0.5, seed=3)
  step = tf.function(lambda x: layer(x, training=True))
  x = tf.ones([64, 64])
  assert not np.array_equal(step(x), step(x))


def test_alpha_dropout_closed_form_and_moments(rng):
  rate = 0.2
  alpha, scale = 1.6732632423543772, 1.0507009873554805
  saturation = -alpha * scale
  a = ((1 - rate) * (1 + rate * saturation**2)) ** -0.5
  b = -a * saturation * rate
  x = rng.normal(size=(400, 500)).astype("float32")
  layer = layers.AlphaDropout(rate, seed=0)
  np.testing.assert_array_equal(layer(x, training=False), x)
  out = layer(x, training=True).numpy()
  dropped = np.isclose(out, a * saturation + b, atol=1e-6)
  np.testing.assert_allclose(out[~dropped], a * x[~dropped] + b, rtol=1e-5,
                             atol=1e-6)
  assert abs(dropped.mean() - rate) < 0.005
  # Self-normalization: a standardized input stays mean 0, variance 1.
  assert abs(out.mean()) < 0.01 and abs(out.var() - 1.0) < 0.01


@pytest.mark.parametrize("cls", [layers.Dropout, layers.AlphaDropout])
@pytest.mark.parametrize("policy", MIXED_POLICIES)
def test_dropout_under_mixed_precision_drops_the_float32_units(rng, cls,
                                                               policy):
  # Masks drawn in the compute dtype would differ from the float32 layer's,
  # and bfloat16's (multiples of 1/128) would drop 30.5% for a rate of 0.3.
  x = rng.normal(size=(1000, 1000)).astype("float32") + 3.0
  mixed = cls(0.3, seed=5, dtype=policy)(x, training=True)
  full = cls(0.3, seed=5)(x, training=True)
  assert mixed.dtype == keras.DTypePolicy(policy).compute_dtype
  # The input, AlphaDropout's product and its sum each round: 2 ulps.
  ulps = 2 * float(ml_dtypes.finfo(mixed.dtype.name).eps)
  np.testing.assert_allclose(tf.cast(mixed, tf.float32), full, rtol=ulps,
                             atol=ulps)
  if cls is layers.Dropout:
    assert abs(np.mean(tf.cast(mixed, tf.float32) == 0) - 0.3) < 0.0015


# --------------------------------------------------------- WideDeepMerge


def test_wide_deep_merge(rng):
  wide = rng.normal(size=(4, 5)).astype("float32")
  deep = rng.normal(size=(4, 3)).astype("float32")
  merge = layers.WideDeepMerge()
  np.testing.assert_array_equal(merge([wide, deep]),
                                np.concatenate([wide, deep], axis=1))
  wide_in, deep_in = keras.Input((5,)), keras.Input((3,))
  assert merge([wide_in, deep_in]).shape == (None, 8)


def test_wide_deep_merge_checks_batch_sizes_in_graphs():
  unknown_batch = tf.TensorSpec([None, 3])
  traced = tf.function(layers.WideDeepMerge().call,
                       input_signature=[[unknown_batch, unknown_batch]])
  with pytest.raises(tf.errors.InvalidArgumentError, match="batch sizes"):
    traced([tf.ones([2, 3]), tf.ones([4, 3])])


# ---------------------------------------------- Standardize, MinMaxScale


@pytest.mark.parametrize("ours,reference", [
    (layers.Standardize, sklearn.preprocessing.StandardScaler),
    (layers.MinMaxScale, sklearn.preprocessing.MinMaxScaler)])
def test_scalers_match_scikit_learn(rng, ours, reference):
  train = (rng.normal(size=(300, 4)) * [1, 10, 1e3, 0.1] + [0, 5, -1e4, 2]
           ).astype("float32")
  train[:, 3] = 2.5  # a constant feature must map to 0, not inf/NaN
  test = rng.normal(size=(20, 4)).astype("float32")
  expected = reference().fit(train.astype("float64")).transform(test)
  from_array = ours()
  from_array.adapt(train)
  np.testing.assert_allclose(from_array(test), expected, rtol=1e-4, atol=1e-4)
  from_batches = ours()
  from_batches.adapt(tf.data.Dataset.from_tensor_slices(train).batch(7))
  np.testing.assert_allclose(from_batches(test), expected, rtol=1e-4,
                             atol=1e-4)
  assert np.all(np.isfinite(from_array(train)))


def test_standardize_matches_keras_normalization(rng):
  train = rng.normal(size=(100, 2, 3)).astype("float32") * 4 + 1
  ours = layers.Standardize()
  ours.adapt(train)
  theirs = keras.layers.Normalization()
  theirs.adapt(train)
  np.testing.assert_allclose(ours(train), theirs(train), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", MIXED_POLICIES)
def test_scalers_under_mixed_precision_match_keras_normalization(rng, policy):
  # Spreads below 255, so Keras' variance fits float16.
  scales, shifts = np.array([1, 10, 30]), np.array([0, 5, -50])
  train = (rng.normal(size=(200, 3)) * scales + shifts).astype("float32")
  x = (rng.normal(size=(50, 3)) * scales + shifts).astype("float32")
  spread = train.max(0) - train.min(0)
  for ours, mean, variance in [
      (layers.Standardize, train.mean(0), train.var(0)),
      (layers.MinMaxScale, train.min(0), spread**2)]:
    layer = ours(dtype=policy)
    layer.adapt(train)
    outputs = layer(x)
    expected = keras.layers.Normalization(mean=mean, variance=variance,
                                          dtype=policy)(x)
    assert outputs.dtype == expected.dtype == layer.compute_dtype
    assert [w.dtype for w in layer.weights] == ["float32", "float32"]
    ulp = float(ml_dtypes.finfo(outputs.dtype.name).eps)
    np.testing.assert_allclose(tf.cast(outputs, tf.float32),
                               tf.cast(expected, tf.float32), rtol=ulp,
                               atol=ulp, err_msg=ours.__name__)


def test_scaler_adapt_errors():
  with pytest.raises(ValueError, match="empty"):
    layers.Standardize().adapt(np.zeros((0, 3), "float32"))
  with pytest.raises(ValueError, match="NaN"):
    layers.MinMaxScale().adapt(np.array([[1.0], [np.nan]]))
  with pytest.raises(ValueError, match="feature batches only"):
    layers.Standardize().adapt(
        tf.data.Dataset.from_tensor_slices((np.ones((4, 2)), np.ones(4))))
  with pytest.raises(ValueError, match=r"\[examples, \.\.\., features\]"):
    layers.Standardize().adapt(np.ones(5))


# ---------------------------------------------------- every layer saved


@pytest.mark.parametrize("policy", ("float32",) + MIXED_POLICIES)
def test_model_of_every_layer_survives_a_keras_file(rng, tmp_path, policy):
  """Under each global dtype policy: outputs in its compute dtype, float32
  variables, and the policy saved with each layer."""
  with global_dtype_policy(policy):
    wide_in, deep_in = keras.Input((3,), name="wide"), keras.Input(
        (4,), name="deep")
    deep = layers.Dense(8, "selu")(layers.MinMaxScale()(deep_in))
    deep = layers.AlphaDropout(0.1, seed=1)(deep)
    deep = layers.BatchNormalization()(deep)
    deep = layers.Dropout(0.2, seed=2)(deep)
    merged = layers.WideDeepMerge()([layers.Standardize()(wide_in), deep])
    model = keras.Model([wide_in, deep_in], layers.Dense(1)(merged))
  inputs = [rng.normal(size=(5, 3)).astype("float32"),
            rng.normal(size=(5, 4)).astype("float32")]
  # Moves the BN statistics off their defaults.
  outputs = model(inputs, training=True)
  assert outputs.dtype == keras.DTypePolicy(policy).compute_dtype
  assert {v.dtype for v in model.weights} == {"float32"}
  loaded = saved_and_loaded(model, tmp_path)
  np.testing.assert_allclose(tf.cast(loaded(inputs), tf.float32),
                             tf.cast(model(inputs), tf.float32), rtol=1e-6)
  assert [type(l).__name__ for l in loaded.layers] == [
      type(l).__name__ for l in model.layers]
  assert {l.dtype_policy.name for l in loaded.layers
          if not isinstance(l, keras.layers.InputLayer)} == {policy}
