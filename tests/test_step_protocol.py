"""A `TrainingStep` written directly, as BUILD.md's "Adding a training
step" recipe writes one: two networks, an optimizer each, trained through
`train` in every custom loop, resumed, and traced by `compare`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import training_loops
import step_models
from loop_models import CUSTOM_LOOPS

SEED = 11


class TwoPlayerStep(training_loops.TrainingStep):
  """`a` regresses `y` with SGD; `b` regresses what `a` leaves (its
  residual, held constant) with Adam. One step updates both."""

  def __init__(self):
    inputs = keras.Input((step_models.FEATURES,))
    self.a = keras.Sequential([keras.layers.Dense(4, "relu"),
                               keras.layers.Dense(1)], name="a")
    self.b = keras.Sequential([keras.layers.Dense(1)], name="b")
    super().__init__(keras.Model(inputs, {"a": self.a(inputs),
                                          "b": self.b(inputs)}))
    self.a_optimizer = keras.optimizers.SGD(0.05, momentum=0.5)
    self.b_optimizer = keras.optimizers.Adam(0.01)
    self.a_optimizer.build(self.a.trainable_variables)
    self.b_optimizer.build(self.b.trainable_variables)
    self.train_trackers = [keras.metrics.Mean(name=name)
                           for name in ("a_loss", "b_loss")]
    self.eval_trackers = [keras.metrics.Mean(name=name)
                          for name in ("a_loss", "b_loss")]

  def _losses(self, x, y, training):
    residual = y - self.a(x, training=training)
    return (tf.reduce_mean(tf.square(residual)),
            tf.reduce_mean(tf.square(tf.stop_gradient(residual)
                                     - self.b(x, training=training))))

  def train_replica_step(self, batch):
    x, y = batch
    replicas = self.strategy.num_replicas_in_sync
    with tf.GradientTape(persistent=True) as tape:
      a_loss, b_loss = self._losses(x, y, training=True)
      # Keras' optimizers sum the replicas' gradients.
      shares = a_loss / replicas, b_loss / replicas
    for network, optimizer, loss in ((self.a, self.a_optimizer, shares[0]),
                                     (self.b, self.b_optimizer, shares[1])):
      gradients = tape.gradient(loss, network.trainable_variables)
      optimizer.apply_gradients(zip(gradients, network.trainable_variables))
    return self._track(self.train_trackers, (a_loss, b_loss))

  def eval_replica_step(self, batch):
    x, y = batch
    return self._track(self.eval_trackers,
                       self._losses(x, y, training=False))

  @staticmethod
  def _track(trackers, values):
    for tracker, value in zip(trackers, values):
      tracker.update_state(value)
    return {tracker.name: tracker.result() for tracker in trackers}

  def logs_spec(self, training=True):
    return {"a_loss": tf.TensorSpec([], tf.float32),
            "b_loss": tf.TensorSpec([], tf.float32)}

  def reset(self):
    for tracker in self.train_trackers:
      tracker.reset_state()

  def reset_eval(self):
    for tracker in self.eval_trackers:
      tracker.reset_state()

  def train_logs(self, last_logs=None):
    return {t.name: t.result() for t in self.train_trackers}

  def eval_logs(self, last_logs=None, prefix="val_"):
    return {prefix + t.name: t.result() for t in self.eval_trackers}

  def optimizers(self):
    return {"a": self.a_optimizer, "b": self.b_optimizer}

  def progress_variables(self):
    return [v for t in self.train_trackers for v in t.variables]


def _reference(epochs):
  """The step alone, called batch by batch in plain Python: no loop, no
  strategy, no controller."""
  keras.utils.set_random_seed(SEED)
  step = TwoPlayerStep()
  history = {"a_loss": [], "b_loss": []}
  for _ in range(epochs):
    step.reset()
    for batch in step_models.regression_data():
      step.train_replica_step(batch)
    for key, value in step.train_logs().items():
      history[key].append(float(value))
  return step, history


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_a_step_written_to_the_protocol_trains_resumes_and_validates(
    loop, tmp_path):
  reference, reference_history = _reference(epochs=3)
  data = step_models.regression_data
  training_loops.train(TwoPlayerStep, train_data=data(), loop=loop,
                       epochs=1, seed=SEED, verbose=0,
                       checkpoint_dir=tmp_path)
  begun = []
  history = training_loops.train(
      TwoPlayerStep, train_data=data(), validation_data=data(seed=1),
      loop=loop, epochs=3, seed=SEED, verbose=0, checkpoint_dir=tmp_path,
      callbacks=[keras.callbacks.LambdaCallback(
          on_epoch_begin=lambda epoch, logs: begun.append(epoch))])
  assert begun == [1, 2]
  for weight, expected in zip(history.model.get_weights(),
                              reference.model.get_weights()):
    np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=1e-6)
  for key, values in reference_history.items():
    np.testing.assert_allclose(history.history[key], values, rtol=1e-5)
  assert {"val_a_loss", "val_b_loss", "a_learning_rate",
          "b_learning_rate"} <= set(history.history)


def test_lockstep_traces_the_protocol_step_in_the_custom_loops():
  report = training_loops.compare(
      TwoPlayerStep, data=step_models.regression_data(), steps=5,
      loops=CUSTOM_LOOPS, optimizer_variables=True)
  assert report.agreed, str(report)
  assert report.steps_compared == 5


def test_keras_fit_refuses_a_protocol_step_in_one_line():
  with pytest.raises(ValueError, match=r"^keras_fit runs a keras.Model's "
                     r"train_step; TwoPlayerStep is a TrainingStep"):
    training_loops.train(TwoPlayerStep,
                         train_data=step_models.regression_data(),
                         loop="keras_fit", verbose=0)
