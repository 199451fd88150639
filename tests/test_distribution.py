"""Training under tf.distribute strategies."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import layers
import losses
import training_loops
from conftest import REPO
from loop_models import (CUSTOM_LOOPS, assert_same_run, classification_data,
                         classifier, recorded_classifier, run_loop)

SYNCHRONIZED_LOOPS = training_loops.LOOPS


def _batch_norm_classifier(synchronized):
  return keras.Sequential([
      keras.Input((4,)), layers.Dense(8, "relu"),
      layers.BatchNormalization(synchronized=synchronized),
      layers.Dense(3, "softmax")])


def _run(loop, synchronized, strategy=None):
  # The default data: 50 examples in batches of 16, so each epoch ends with
  # a batch of 2 that two replicas split 1 + 1.
  return run_loop(loop, model_fn=lambda: _batch_norm_classifier(synchronized),
                  data=classification_data(), strategy=strategy)


def test_mirrored_two_replicas_equal_one_device(mirrored):
  """Global batch 16 split over two CPUs, with a partial last batch of 2, in
  every loop. Without BatchNorm and Dropout: per-replica statistics (Keras'
  default too) and masks are covered by the tests below."""
  model_fn = lambda: classifier(batch_norm=False)
  for loop in training_loops.LOOPS:
    single = run_loop(loop, model_fn=model_fn).history
    replicated = run_loop(loop, model_fn=model_fn, strategy=mirrored).history
    for key, values in replicated.items():
      np.testing.assert_allclose(values, single[key], rtol=1e-4,
                                 err_msg=f"{loop} {key}")


def test_reshuffled_data_reaches_every_loop_in_fits_order_under_a_strategy(
    mirrored):
  """Under a strategy (two replicas or one device), fit opens the training
  data once before its first epoch (Keras' symbolic build draws a batch),
  so a reshuffling dataset's epochs come in its second order on; every
  loop follows, to fit's weights. Without a strategy fit opens it once per
  epoch only, as the loops do: the first order first."""
  model_fn = lambda: classifier(batch_norm=False)

  def shuffled():
    keras.utils.set_random_seed(3)  # the shuffle's, drawn as it is made
    return classification_data(shuffle=True)

  results = {}
  for strategy in (mirrored, tf.distribute.OneDeviceStrategy("/cpu:0"),
                   None):
    results[strategy] = {
        loop: run_loop(loop, model_fn=model_fn, strategy=strategy,
                       data=shuffled()) for loop in training_loops.LOOPS}
    for loop in CUSTOM_LOOPS:
      assert_same_run(results[strategy][loop],
                      results[strategy]["keras_fit"], rtol=1e-5, atol=1e-7)
  mirrored_loss = results[mirrored]["graph"].history["loss"]
  assert not np.allclose(results[None]["graph"].history["loss"],
                         mirrored_loss, rtol=1e-4)
  # One order on, one device trains as the two replicas did.
  data = shuffled()
  iter(data)
  np.testing.assert_allclose(
      run_loop("graph", model_fn=model_fn, data=data).history["loss"],
      mirrored_loss, rtol=1e-4)


@pytest.mark.parametrize("strategy", [
    lambda: tf.distribute.MirroredStrategy(["/cpu:0"]),
    lambda: tf.distribute.OneDeviceStrategy("/cpu:0")],
    ids=["mirrored_one_replica", "one_device"])
def test_one_replica_strategies_run_every_loop_as_the_default(strategy):
  """One replica under a strategy trains as without one, in every loop
  (the eager loop compiles its update only where `strategy.run` stays in
  the caller's thread: a mirrored strategy's replica thread cannot)."""
  model_fn = lambda: classifier(batch_norm=False)
  for loop in training_loops.LOOPS:
    default = run_loop(loop, model_fn=model_fn).history
    under = run_loop(loop, model_fn=model_fn, strategy=strategy()).history
    for key, values in under.items():
      np.testing.assert_allclose(values, default[key], rtol=1e-5,
                                 err_msg=f"{loop} {key}")


def test_make_strategy_names():
  with pytest.raises(ValueError, match="default, one_device, mirrored"):
    training_loops.make_strategy("tpu")
  assert isinstance(training_loops.make_strategy("one_device"),
                    tf.distribute.OneDeviceStrategy)


@pytest.fixture(scope="module")
def one_replica_runs():
  """The plain layer on the whole batch, one device: the reference."""
  return {loop: _run(loop, synchronized=False) for loop in SYNCHRONIZED_LOOPS}


@pytest.mark.parametrize("loop", SYNCHRONIZED_LOOPS)
def test_synchronized_batch_norm_on_two_replicas_equals_one(
    loop, mirrored, one_replica_runs):
  """Weights, moving statistics (in `get_weights`) and history."""
  replicated = _run(loop, synchronized=True, strategy=mirrored)
  assert_same_run(replicated, one_replica_runs[loop], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loop", SYNCHRONIZED_LOOPS)
def test_per_replica_batch_norm_on_two_replicas_differs_from_one(
    loop, mirrored, one_replica_runs):
  """Each replica normalizing its own shard is another run, so the test
  above can fail."""
  replicated = _run(loop, synchronized=False, strategy=mirrored)
  with pytest.raises(AssertionError):
    assert_same_run(replicated, one_replica_runs[loop], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", [(3, 1), (2, 0)])
def test_synchronized_moments_are_those_of_the_concatenated_shards(
    rng, mirrored, split):
  rows = (rng.normal(size=(sum(split), 3)) * 4 + 10).astype("float32")
  shards = np.split(rows, [split[0]])
  layer = layers.BatchNormalization(synchronized=True)
  with mirrored.scope():
    layer.build((None, 3))
  per_replica = mirrored.experimental_distribute_values_from_function(
      lambda context: tf.constant(shards[context.replica_id_in_sync_group]))
  moments = tf.function(lambda x: mirrored.run(layer._moments, args=(x,)))(
      per_replica)
  expected = rows.astype("float64")
  for replica in range(2):
    mean, variance = (mirrored.experimental_local_results(m)[replica]
                      for m in moments)
    np.testing.assert_allclose(mean, expected.mean(0), rtol=1e-6)
    np.testing.assert_allclose(variance, expected.var(0), rtol=1e-5)
  # In the cross-replica context there is nothing to synchronize with.
  with mirrored.scope():
    mean, variance = layer._moments(tf.constant(shards[0]))
  np.testing.assert_allclose(mean, expected[:split[0]].mean(0), rtol=1e-6)
  np.testing.assert_allclose(variance, expected[:split[0]].var(0), rtol=1e-5)


def test_metrics_that_build_at_their_first_update_under_two_replicas(
    mirrored):
  """F1Score creates its state at its first update: built under the
  strategy, as mirrored variables, in every loop."""
  data = classification_data().map(lambda x, y: (x, tf.one_hot(y, 3)))
  for loop in training_loops.LOOPS:
    runs = [run_loop(loop, model_fn=lambda: classifier(batch_norm=False),
                     data=data, loss=losses.CategoricalCrossentropy(),
                     metrics=[keras.metrics.F1Score(average="macro")],
                     strategy=strategy).history
            for strategy in (None, mirrored)]
    np.testing.assert_allclose(runs[1]["f1_score"], runs[0]["f1_score"],
                               rtol=1e-5, err_msg=loop)


@pytest.mark.parametrize("loop", ["function", "graph", "keras_fit"])
def test_xla_on_replicas_on_several_cpus_is_refused(mirrored, loop):
  """Each XLA loop, fit's too, would fail at its first step on the
  variables of the second CPU device."""
  with pytest.raises(ValueError, match="jit_compile cannot train replicas "
                                       r"on several CPU devices \(2 here\)"):
    run_loop(loop, model_fn=lambda: classifier(batch_norm=False),
             data=classification_data(drop_remainder=True), jit_compile=True,
             strategy=mirrored)


def test_xla_in_the_eager_loop_is_refused_for_the_loop_before_the_devices(
    mirrored):
  """The eager loop never compiles: its own reason comes first, not the
  devices'."""
  with pytest.raises(ValueError, match=r"^jit_compile needs loop="
                                       r"'function', 'graph' or 'keras_fit'"):
    run_loop("eager", model_fn=lambda: classifier(batch_norm=False),
             jit_compile=True, strategy=mirrored)


@pytest.mark.parametrize("strategy", [
    lambda: tf.distribute.MirroredStrategy(["/cpu:0"]),
    lambda: tf.distribute.OneDeviceStrategy("/cpu:0")],
    ids=["mirrored_one_replica", "one_device"])
def test_graph_loop_xla_on_one_replica_strategies_as_the_default(strategy):
  """Batches of one static shape take the XLA chunks (or, in a mirrored
  strategy's replica thread, XLA step by step)."""
  runs = [run_loop("graph", model_fn=lambda: classifier(batch_norm=False),
                   data=classification_data(drop_remainder=True),
                   jit_compile=True, strategy=under).history
          for under in (None, strategy())]
  for key, values in runs[1].items():
    np.testing.assert_allclose(values, runs[0][key], rtol=1e-5, err_msg=key)


_TWO_STRATEGIES_ON_THE_SAME_DEVICES = """
import sys
import tensorflow as tf
import training_loops
from loop_models import run_loop
first = training_loops.make_strategy("mirrored", cpu_replicas=2)
assert training_loops.make_strategy("mirrored", cpu_replicas=2) is first
run_loop("graph", strategy=first, epochs=1)
# Built apart from make_strategy: its collectives are numbered as first's.
second = tf.distribute.MirroredStrategy(first.extended.worker_devices)
try:
  run_loop("keras_fit", strategy=second, epochs=1)
except training_loops.CollectiveMismatchError as error:
  print(error)
"""


def test_two_strategies_on_the_same_devices_are_named_not_bad_data():
  """make_strategy reuses one mirrored strategy per device set; two built
  apart have their collectives meet, which is named as such rather than as
  a rejected batch. In a process of its own: the collision would abort
  this one's collectives for good."""
  ran = subprocess.run([sys.executable, "-c",
                        _TWO_STRATEGIES_ON_THE_SAME_DEVICES],
                       cwd=os.path.join(REPO, "tests"), capture_output=True,
                       text=True, timeout=300, check=False,
                       env={**os.environ, "PYTHONPATH": REPO})
  assert ran.returncode == 0, ran.stderr[-2000:]
  assert re.fullmatch(
      r"The replicas' collective ops did not match in epoch 0 \(0-based\) "
      r"\(Shape mismatch in the collective instance \d+\): two "
      r"tf\.distribute strategies on the same devices in this process "
      r"\(build one per set of devices and reuse it, as make_strategy "
      r"does\), or workers training different models\.",
      ran.stdout.strip()), ran.stdout


def test_each_replica_trains_on_its_half_of_every_batch(mirrored):
  """The equality tests above would pass if the strategy were ignored;
  this one reads what each replica saw: the first half of every global
  batch of 16 on replica 0, the second on replica 1, the last batch of 2
  split 1 + 1; and the weights equal one device's, so the gradients
  were summed."""
  data = classification_data()
  x = np.concatenate([batch[0].numpy() for batch in data])
  # Each global batch's halves: [0, 8), [8, 16), ... and 48 | 49.
  halves = [np.concatenate([x[start:start + 8] for start in (0, 16, 32)]
                           + [x[48:49]]),
            np.concatenate([x[start + 8:start + 16] for start in (0, 16, 32)]
                           + [x[49:50]])]
  recorders = []
  model_fn = lambda: recorded_classifier(recorders)
  for loop in training_loops.LOOPS:
    single = run_loop(loop, epochs=1, model_fn=model_fn, data=data)
    replicated = run_loop(loop, epochs=1, model_fn=model_fn, data=data,
                          strategy=mirrored)
    counts, sums = zip(*recorders[-1].seen(mirrored))
    assert counts == (25.0, 25.0), loop
    np.testing.assert_allclose(sums, [half.sum() for half in halves],
                               rtol=1e-5, err_msg=loop)
    assert_same_run(replicated, single, rtol=1e-5, atol=1e-6)
