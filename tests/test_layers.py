"""Each layer against Keras' own layer with the same weights, NumPy and
scikit-learn; plus tf.function, Sequential/functional use and .keras files."""

import keras
import numpy as np
import pytest
import sklearn.preprocessing
import tensorflow as tf

import layers
from conftest import saved_and_loaded


def _grads(layer, x, training=None):
  x = tf.convert_to_tensor(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=training) if training is not None else layer(x)
    target = tf.reduce_sum(y * tf.cos(y))  # a non-linear read-out
  return tape.gradient(target, [x] + layer.trainable_weights)


# ---------------------------------------------------------------- Dense


@pytest.mark.parametrize("shape,activation,use_bias", [
    ((5, 4), None, True), ((2, 3, 4), "relu", True), ((5, 4), "tanh", False),
    ((5, 4), "softmax", True)])
def test_dense_matches_keras(rng, shape, activation, use_bias):
  x = rng.normal(size=shape).astype("float32")
  ours = layers.Dense(3, activation=activation, use_bias=use_bias)
  ours.build(shape)
  theirs = keras.layers.Dense(3, activation=activation, use_bias=use_bias)
  theirs.build(shape)
  theirs.set_weights(ours.get_weights())
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
  for g_ours, g_theirs in zip(_grads(ours, x), _grads(theirs, x)):
    np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-6)
  numpy_out = x @ ours.kernel.numpy() + (ours.bias.numpy() if use_bias else 0)
  if activation is None:
    np.testing.assert_allclose(ours(x), numpy_out, rtol=1e-5, atol=1e-6)


def test_dense_weights_and_errors():
  dense = layers.Dense(7)
  dense.build((None, 4))
  assert dense.kernel.shape == (4, 7) and dense.bias.shape == (7,)
  with pytest.raises(ValueError, match="rank >= 2"):
    layers.Dense(3)(tf.ones([4]))
  with pytest.raises(ValueError, match="positive int"):
    layers.Dense(0)


def test_dense_in_tf_function_sequential_functional_and_saved(rng, tmp_path):
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


def test_get_config_round_trips():
  for layer in [layers.Dense(3, "relu", use_bias=False,
                             kernel_initializer="he_normal"),
                layers.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-4,
                                          center=False),
                layers.Dropout(0.3, seed=4), layers.AlphaDropout(0.1, seed=2),
                layers.WideDeepMerge(), layers.Standardize(),
                layers.MinMaxScale()]:
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config


# ---------------------------------------------------- BatchNormalization


@pytest.mark.parametrize("axis,shape", [(-1, (8, 3)), (1, (4, 3, 5)),
                                        (-1, (4, 2, 3))])
def test_batch_normalization_matches_keras(rng, axis, shape):
  ours = layers.BatchNormalization(axis=axis, momentum=0.9)
  theirs = keras.layers.BatchNormalization(axis=axis, momentum=0.9)
  ours.build(shape)
  theirs.build(shape)
  weights = [rng.normal(size=w.shape).astype("float32") + 1.5
             for w in ours.get_weights()]
  ours.set_weights(weights)
  theirs.set_weights(weights)
  for step in range(4):
    x = (rng.normal(size=shape) * (step + 1) + step).astype("float32")
    np.testing.assert_allclose(ours(x, training=True),
                               theirs(x, training=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.moving_mean, theirs.moving_mean,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.moving_variance, theirs.moving_variance,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours(x, training=False),
                               theirs(x, training=False), rtol=1e-5,
                               atol=1e-5)
  for training in (True, False):
    for g_ours, g_theirs in zip(_grads(ours, x, training),
                                _grads(theirs, x, training)):
      np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-4, atol=1e-5)


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


def test_batch_normalization_errors():
  with pytest.raises(ValueError, match="axis 3 is out of range"):
    layers.BatchNormalization(axis=3)(tf.ones([2, 3]))
  with pytest.raises(ValueError, match="momentum"):
    layers.BatchNormalization(momentum=1.5)


# ---------------------------------------------------------------- Dropout


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "0.5", True])
@pytest.mark.parametrize("cls", [layers.Dropout, layers.AlphaDropout])
def test_dropout_rejects_bad_rates(cls, rate):
  with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
    cls(rate)


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


# --------------------------------------------------------- WideDeepMerge


def test_wide_deep_merge(rng):
  wide = rng.normal(size=(4, 5)).astype("float32")
  deep = rng.normal(size=(4, 3)).astype("float32")
  merge = layers.WideDeepMerge()
  np.testing.assert_array_equal(merge([wide, deep]),
                                np.concatenate([wide, deep], axis=1))
  wide_in, deep_in = keras.Input((5,)), keras.Input((3,))
  assert merge([wide_in, deep_in]).shape == (None, 8)


def test_wide_deep_merge_errors(rng):
  merge = layers.WideDeepMerge()
  with pytest.raises(ValueError, match="exactly two inputs"):
    merge([tf.ones([2, 3])] * 3)
  with pytest.raises(ValueError, match="deep input must have rank 2"):
    merge([tf.ones([2, 3]), tf.ones([2, 3, 1])])
  with pytest.raises(ValueError, match="batch sizes differ"):
    layers.WideDeepMerge()([tf.ones([2, 3]), tf.ones([4, 3])])
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


def test_scaler_errors_and_save(rng, tmp_path):
  layer = layers.Standardize()
  with pytest.raises(ValueError, match="empty"):
    layer.adapt(np.zeros((0, 3), "float32"))
  with pytest.raises(ValueError, match="NaN"):
    layers.MinMaxScale().adapt(np.array([[1.0], [np.nan]]))
  with pytest.raises(ValueError, match="feature batches only"):
    layers.Standardize().adapt(
        tf.data.Dataset.from_tensor_slices((np.ones((4, 2)), np.ones(4))))
  with pytest.raises(ValueError, match=r"\[examples, \.\.\., features\]"):
    layers.Standardize().adapt(np.ones(5))
  train = rng.normal(size=(50, 3)).astype("float32") * 3 + 7
  scaler = layers.Standardize()
  scaler.adapt(train)
  model = keras.Sequential([keras.Input((3,)), scaler, layers.Dense(2)])
  np.testing.assert_allclose(saved_and_loaded(model, tmp_path)(train),
                             model(train), rtol=1e-6)


# ---------------------------------------------------- every layer saved


def test_model_of_every_layer_survives_a_keras_file(rng, tmp_path):
  wide_in, deep_in = keras.Input((3,), name="wide"), keras.Input((4,),
                                                                 name="deep")
  deep = layers.Dense(8, "selu")(layers.MinMaxScale()(deep_in))
  deep = layers.AlphaDropout(0.1, seed=1)(deep)
  deep = layers.BatchNormalization()(deep)
  deep = layers.Dropout(0.2, seed=2)(deep)
  merged = layers.WideDeepMerge()([layers.Standardize()(wide_in), deep])
  model = keras.Model([wide_in, deep_in], layers.Dense(1)(merged))
  inputs = [rng.normal(size=(5, 3)).astype("float32"),
            rng.normal(size=(5, 4)).astype("float32")]
  model(inputs, training=True)  # move the BN statistics off their defaults
  loaded = saved_and_loaded(model, tmp_path)
  np.testing.assert_allclose(loaded(inputs), model(inputs), rtol=1e-6)
  assert [type(l).__name__ for l in loaded.layers] == [
      type(l).__name__ for l in model.layers]
