"""The checks every layer gets, declared once per configuration.

In the spirit of Keras' `run_layer_test` (keras/src/testing/test_case.py):
a `LayerSpec` says how to construct a layer, what to feed it and which
Keras layer it must equal; `check_layer` runs every check on it.
"""

import contextlib
import dataclasses
import inspect
from typing import Any, Callable, Optional

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from conftest import saved_and_loaded


@dataclasses.dataclass(frozen=True)
class Misuse:
  """A use that must raise a `ValueError` whose message matches `match`.

  Constructing the layer with `kwargs` over the spec's, or, with
  `input_shape`, calling the layer so constructed on ones of that shape
  (a list of shapes for several inputs).
  """
  kwargs: dict
  match: str
  input_shape: Any = None


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One configuration of a layer and what it must satisfy.

  Attributes:
    cls: the layer class; the layer is `cls(**kwargs)`.
    kwargs: its constructor arguments.
    input_shape: the inputs' shape, batch first (a list of shapes for
      several inputs). Inputs are drawn from a normal distribution, scaled
      by `step + 1` and shifted by `step` in the reference's step `step`.
    weight_shapes: `{name: shape}` of every weight once built.
    prepare: `prepare(layer, inputs)` moves the layer's state off its
      initial values before it is saved (fitting, a training call).
    misuses: `Misuse`s that must be refused.
    reference: Keras' layer class, constructed with the same `kwargs`.
    reference_weights: `reference_weights(rng, shape)` draws the weights
      both layers start from; by default the reference copies ours.
    training: the `training` values the reference is compared in.
    steps: calls on new inputs (each in every `training` mode) before the
      gradients are compared, for layers whose state moves when called.
    output_tol, weight_tol, gradient_tol: `(rtol, atol)` against the
      reference for outputs, weights after each call and gradients.
  """
  cls: type
  kwargs: dict
  input_shape: Any
  weight_shapes: dict = dataclasses.field(default_factory=dict)
  prepare: Optional[Callable] = None
  misuses: tuple = ()
  reference: Optional[type] = None
  reference_weights: Optional[Callable] = None
  training: tuple = (None,)
  steps: int = 1
  output_tol: tuple = (0.0, 0.0)
  weight_tol: tuple = (0.0, 0.0)
  gradient_tol: tuple = (0.0, 0.0)

  def __str__(self):
    arguments = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
    return f"{self.cls.__name__}({arguments})-{self.input_shape}"

  def make(self, **overrides):
    return self.cls(**{**self.kwargs, **overrides})


@contextlib.contextmanager
def global_dtype_policy(name):
  """Keras' global dtype policy `name`, float32 again afterwards: tests
  share one process."""
  keras.mixed_precision.set_dtype_policy(name)
  try:
    yield
  finally:
    keras.mixed_precision.set_dtype_policy("float32")


def check_layer(spec, tmp_path, seed=0):
  """Every check, the cheap ones first. Each draws its data from a new
  generator seeded with `seed`, so its numbers do not depend on the others.
  """
  _check_build(spec, np.random.default_rng(seed))
  _check_config_round_trip(spec)
  _check_misuses(spec)
  _check_saved_and_traced(spec, np.random.default_rng(seed), tmp_path)
  if spec.reference is not None:
    _check_against_reference(spec, np.random.default_rng(seed))


def _grads(layer, x, training=None):
  """Gradients of a non-linear read-out of `layer(x)` with respect to `x`
  (flattened) and then the layer's trainable weights."""
  x = tf.nest.map_structure(tf.convert_to_tensor, x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=training)
    target = tf.reduce_sum(y * tf.cos(y))
  return tape.gradient(target, tf.nest.flatten(x) + layer.trainable_weights)


def _several(shape):
  return isinstance(shape, list)


def _inputs(shape, rng, step=0):
  if _several(shape):
    return [_inputs(s, rng, step) for s in shape]
  return (rng.normal(size=shape) * (step + 1) + step).astype("float32")


def _ones(shape):
  return [_ones(s) for s in shape] if _several(shape) else tf.ones(shape)


def _unknown_batch(shape):
  if _several(shape):
    return [_unknown_batch(s) for s in shape]
  return (None,) + tuple(shape[1:])


def _check_build(spec, rng):
  layer = spec.make()
  layer.build(_unknown_batch(spec.input_shape))
  assert {w.name: tuple(w.shape) for w in layer.weights} == {
      name: tuple(shape) for name, shape in spec.weight_shapes.items()}
  outputs = layer(_inputs(spec.input_shape, rng))
  assert tuple(layer.compute_output_shape(spec.input_shape)) == tuple(
      outputs.shape)


def _check_config_round_trip(spec):
  config = spec.make().get_config()
  arguments = [name for name, parameter in
               inspect.signature(spec.cls.__init__).parameters.items()
               if name != "self" and parameter.kind in (
                   parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)]
  assert set(arguments) <= set(config), "get_config misses an argument"
  assert spec.cls.from_config(config).get_config() == config


def _check_misuses(spec):
  for misuse in spec.misuses:
    if misuse.input_shape is None:
      with pytest.raises(ValueError, match=misuse.match):
        spec.make(**misuse.kwargs)
    else:
      layer = spec.make(**misuse.kwargs)
      with pytest.raises(ValueError, match=misuse.match):
        layer(_ones(misuse.input_shape))


def _check_saved_and_traced(spec, rng, tmp_path):
  """A `.keras` file (safe mode) keeps the layer's config and, like a
  `tf.function`, the outputs of the model that holds it."""
  layer = spec.make()
  shapes = spec.input_shape
  inputs = ([keras.Input(s[1:]) for s in shapes] if _several(shapes)
            else keras.Input(shapes[1:]))
  model = keras.Model(inputs, layer(inputs))
  x = _inputs(shapes, rng)
  if spec.prepare is not None:
    spec.prepare(layer, x)
  expected = model(x)
  loaded = saved_and_loaded(model, tmp_path)
  assert loaded.layers[-1].get_config() == layer.get_config()
  np.testing.assert_allclose(loaded(x), expected, rtol=1e-6)
  np.testing.assert_allclose(tf.function(model)(x), expected, rtol=1e-6)


def check_mixed_precision(spec, policy, seed=0):
  """Our layer and Keras', each given `dtype=policy` (a mixed precision
  policy), against each other as in float32: outputs of the policy's compute
  dtype, float32 weights. Outputs and gradients may differ by one unit in
  the last place of the compute dtype; weights, BatchNormalization's moving
  statistics included, by the float32 tolerance, as both compute them in
  float32."""
  _check_against_reference(spec, np.random.default_rng(seed), policy)


def _check_against_reference(spec, rng, policy=None):
  dtype = {} if policy is None else {"dtype": policy}
  ours, theirs = spec.make(**dtype), spec.reference(**spec.kwargs, **dtype)
  ours.build(spec.input_shape)
  theirs.build(spec.input_shape)
  output_tol, gradient_tol = spec.output_tol, spec.gradient_tol
  if policy is not None:
    assert {w.dtype for w in ours.weights} <= {"float32"}
    ulp = float(ml_dtypes.finfo(ours.compute_dtype).eps)
    output_tol, gradient_tol = (
        tuple(max(tol, ulp) for tol in tols)
        for tols in (output_tol, gradient_tol))
  weights = ours.get_weights()
  assert len(theirs.get_weights()) == len(weights)
  if spec.reference_weights is not None:
    weights = [spec.reference_weights(rng, w.shape) for w in weights]
  ours.set_weights(weights)
  theirs.set_weights(weights)
  for step in range(spec.steps):
    x = _inputs(spec.input_shape, rng, step)
    for training in spec.training:
      outputs = ours(x, training=training)
      expected = theirs(x, training=training)
      assert outputs.dtype == expected.dtype == ours.compute_dtype
      _assert_close(outputs, expected, output_tol, f"training={training}")
      for w_ours, w_theirs in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(w_ours, w_theirs, rtol=spec.weight_tol[0],
                                   atol=spec.weight_tol[1])
  for training in spec.training:
    ours_grads = _grads(ours, x, training)
    their_grads = _grads(theirs, x, training)
    assert len(ours_grads) == len(their_grads)
    for g_ours, g_theirs in zip(ours_grads, their_grads):
      _assert_close(g_ours, g_theirs, gradient_tol, f"training={training}")


def _assert_close(actual, expected, tolerance, message):
  """`assert_allclose` for any float dtype (NumPy has no bfloat16)."""
  rtol, atol = tolerance
  np.testing.assert_allclose(tf.cast(actual, tf.float32),
                             tf.cast(expected, tf.float32), rtol=rtol,
                             atol=atol, err_msg=message)
