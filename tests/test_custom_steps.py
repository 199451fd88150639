"""A model's own training step in every loop, against plain `model.fit`.

Each model of `step_models` (the guide's `train_step`, a GAN, WGAN-GP, a
VAE, Keras' `Distiller`) is trained by `train` in every loop and by
`model.fit` on the same seed and data: the weights and every epoch's logs
must agree.
"""

import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
import loop_models
import training_loops
from training_loops import drivers
import step_models
from loop_models import CUSTOM_LOOPS

# (name, model_fn, data_fn, with validation data, tolerance)
MODELS = [
    ("guide", step_models.guide_fn, step_models.regression_data, True, 1e-5),
    ("gan", step_models.gan_fn, step_models.images_data, False, 1e-4),
    ("wgan_gp", step_models.wgan_gp_fn, step_models.images_data, False,
     1e-4),
    ("vae", step_models.vae_fn, step_models.images_data, True, 1e-5),
    ("distiller", step_models.distiller_fn, step_models.classification_data,
     True, 1e-5),
]
# Every loop, and the graph loop one step a call.
LOOP_VARIANTS = [(loop, None) for loop in training_loops.LOOPS] + [
    ("graph", 1)]
SEED = 5
# What the history logs beside the step's logs: each optimizer's rate.
LEARNING_RATES = {
    "guide": {"learning_rate"}, "vae": {"learning_rate"},
    "distiller": {"learning_rate"},
    "gan": {"d_optimizer_learning_rate", "g_optimizer_learning_rate"},
    "wgan_gp": {"d_optimizer_learning_rate", "g_optimizer_learning_rate"}}


def _plain_fit(model_fn, data_fn, validate, epochs=2, strategy=None):
  """The oracle: the model built on the seed and trained by `model.fit`."""
  keras.utils.set_random_seed(SEED)
  with (strategy or tf.distribute.get_strategy()).scope():
    model = model_fn()
  history = model.fit(data_fn(), epochs=epochs, shuffle=False, verbose=0,
                      validation_data=data_fn(seed=1) if validate else None)
  return model, history.history


def _trained(model_fn, data_fn, validate, loop, steps_per_loop=None,
             epochs=2, **kwargs):
  return training_loops.train(
      model_fn, train_data=data_fn(), loop=loop, epochs=epochs, seed=SEED,
      verbose=0, steps_per_loop=steps_per_loop,
      validation_data=data_fn(seed=1) if validate else None, **kwargs)


def _assert_same(history, model, logs, tolerance):
  for weight, expected in zip(history.model.get_weights(),
                              model.get_weights()):
    np.testing.assert_allclose(weight, expected, rtol=tolerance,
                               atol=tolerance)
  for key, values in logs.items():
    np.testing.assert_allclose(history.history[key], values,
                               rtol=tolerance, atol=tolerance, err_msg=key)


@pytest.fixture(scope="module")
def oracles():
  return {name: _plain_fit(model_fn, data_fn, validate)
          for name, model_fn, data_fn, validate, _ in MODELS}


@pytest.mark.parametrize("loop, steps_per_loop", LOOP_VARIANTS)
@pytest.mark.parametrize("name, model_fn, data_fn, validate, tolerance",
                         MODELS, ids=[model[0] for model in MODELS])
def test_a_models_own_step_trains_as_plain_fit_in_every_loop(
    oracles, name, model_fn, data_fn, validate, tolerance, loop,
    steps_per_loop):
  model, logs = oracles[name]
  history = _trained(model_fn, data_fn, validate, loop, steps_per_loop)
  assert set(history.history) - set(logs) == LEARNING_RATES[name]
  _assert_same(history, model, logs, tolerance)


def test_the_guide_example_trains_its_own_step_not_the_default_one():
  """The override's penalty is in the loss every loop reports."""
  model, logs = _plain_fit(step_models.guide_fn,
                           step_models.regression_data, False, epochs=1)
  for loop in training_loops.LOOPS:
    history = _trained(step_models.guide_fn, step_models.regression_data,
                       False, loop, epochs=1)
    np.testing.assert_allclose(history.history["loss"], logs["loss"],
                               rtol=1e-5)


def test_the_eager_loop_runs_the_step_op_by_op():
  seen = []

  class Probe(step_models.GuideModel):
    def train_step(self, data):
      seen.append(tf.executing_eagerly() and float(tf.reduce_sum(data[0])))
      return super().train_step(data)

  def model_fn():
    model = Probe()
    model.build((None, step_models.FEATURES))
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    return model
  data = step_models.regression_data()
  training_loops.train(model_fn, train_data=data, loop="eager", verbose=0)
  # The first call is the build's trace; then every batch, eagerly.
  assert seen[0] is False
  assert seen[1:] == pytest.approx([float(tf.reduce_sum(x))
                                    for x, _ in data])


@pytest.mark.parametrize("name", ["gan", "guide"])
def test_own_steps_under_mirrored_strategy_train_as_fit_under_it(mirrored,
                                                                 name):
  """The GAN's optimizers built in its model_fn; the guide's
  `model.optimizer` not, which fit builds before its first step (the loops
  must too: two replicas cannot create it inside the step's trace)."""
  _, model_fn, data_fn, validate, tolerance = next(
      model for model in MODELS if model[0] == name)
  model, logs = _plain_fit(model_fn, data_fn, validate, strategy=mirrored)
  for loop in CUSTOM_LOOPS:
    history = _trained(model_fn, data_fn, validate, loop, strategy=mirrored)
    _assert_same(history, model, logs, tolerance)


def test_optimizers_a_step_would_create_under_two_replicas_are_one_line(
    mirrored):
  def unbuilt_gan():
    model = step_models.GAN()
    model.compile(d_optimizer=keras.optimizers.Adam(1e-3),
                  g_optimizer=keras.optimizers.Adam(1e-3),
                  loss_fn=keras.losses.BinaryCrossentropy(from_logits=True))
    return model
  for loop in training_loops.LOOPS:
    with pytest.raises(ValueError) as raised:
      _trained(unbuilt_gan, step_models.images_data, False, loop,
               strategy=mirrored)
    assert str(raised.value) == (
        "GAN's step creates its optimizers' state (d_optimizer, g_optimizer)"
        " in its first step, which 2 replicas cannot: build each in "
        "model_fn, `optimizer.build(the variables it updates)`, as "
        "model.fit under this strategy needs too.")


def test_a_resumed_gan_ends_as_an_uninterrupted_one(tmp_path):
  """Stopped after epoch 1 and rerun: both optimizers' step counts, the
  noise's seed state and every weight as one uninterrupted run, the rerun
  training only the two epochs left."""
  uninterrupted = _trained(step_models.gan_fn, step_models.images_data,
                           False, "graph", epochs=3)
  for loop in CUSTOM_LOOPS:
    directory = tmp_path / loop
    _trained(step_models.gan_fn, step_models.images_data, False, loop,
             epochs=1, checkpoint_dir=directory)
    begun = []
    resumed = _trained(
        step_models.gan_fn, step_models.images_data, False, loop, epochs=3,
        checkpoint_dir=directory, callbacks=[keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: begun.append(epoch))])
    assert begun == [1, 2] and resumed.epochs == [0, 1, 2]
    _assert_same(resumed, uninterrupted.model, uninterrupted.history, 1e-4)
    for name in ("d_optimizer", "g_optimizer"):
      assert int(getattr(resumed.model, name).iterations) == 9
    np.testing.assert_array_equal(
        resumed.model.seed_generator.state.numpy(),
        uninterrupted.model.seed_generator.state.numpy())


def test_a_step_given_a_loss_or_optimizer_is_refused_in_one_line():
  with pytest.raises(ValueError, match=r"^GAN, whose class defines its own "
                     r"step, takes no optimizer_fn, loss: give"):
    training_loops.train(step_models.gan_fn,
                         lambda: keras.optimizers.SGD(),
                         losses.MeanSquaredError(),
                         step_models.images_data(), verbose=0)
  with pytest.raises(ValueError, match="takes no metrics"):
    training_loops.train(step_models.gan_fn,
                         train_data=step_models.images_data(), verbose=0,
                         metrics=[keras.metrics.Mean()])


def test_an_uncompiled_step_and_a_missing_loss_are_one_line():
  with pytest.raises(ValueError, match="compile it in model_fn"):
    training_loops.train(step_models.GAN,
                         train_data=step_models.images_data(), verbose=0)
  with pytest.raises(ValueError, match="train needs optimizer_fn and loss"):
    training_loops.train(lambda: keras.Sequential([keras.layers.Dense(1)]),
                         train_data=step_models.regression_data(),
                         verbose=0)


def test_data_the_step_does_not_take_is_one_line():
  with pytest.raises(ValueError, match=r"GAN's step does not accept the "
                     r"data's batches \(\(None, 6\), \(None, 1\)\)"):
    training_loops.train(step_models.gan_fn,
                         train_data=step_models.regression_data(), verbose=0)


def test_a_non_finite_step_log_names_it():
  class Exploding(step_models.GAN):
    def train_step(self, real):
      super().train_step(real)
      self.g_loss_tracker.update_state(np.inf)
      return {tracker.name: tracker.result() for tracker in self.metrics}

  def model_fn():
    model = Exploding()
    model.compile(keras.optimizers.Adam(), keras.optimizers.Adam(),
                  keras.losses.BinaryCrossentropy(from_logits=True))
    return model
  for loop in training_loops.LOOPS:
    with pytest.raises(training_loops.NonFiniteLossError,
                       match="Training log 'g_loss' became inf at epoch 0"):
      training_loops.train(model_fn, train_data=step_models.images_data(),
                           loop=loop, verbose=0)


def test_lockstep_traces_a_gan_through_both_optimizers():
  report = training_loops.compare(
      step_models.gan_fn, data=step_models.images_data(), steps=4,
      optimizer_variables=True, rtol=1e-4, atol=1e-6)
  assert report.agreed, str(report)
  assert report.loops == training_loops.LOOPS


def test_lockstep_names_a_generator_optimizer_slot_that_parts():
  class Nudged(drivers.GraphDriver):
    def stepper(self, iterator):
      run = super().stepper(iterator)

      def nudged(limit):
        steps, logs = run(limit)
        slot = self.trainer.model.g_optimizer.variables[-1]
        slot.assign(slot + 1e-2)
        return steps, logs
      return nudged
  drivers.register("nudged_slot")(Nudged)
  try:
    report = training_loops.compare(
        step_models.gan_fn, data=step_models.images_data(), steps=3,
        loops=("graph", "nudged_slot"), optimizer_variables=True)
  finally:
    del drivers.DRIVERS["nudged_slot"]
  divergence = report.first_divergence
  assert divergence.step == 1 and divergence.log is None
  # Keras numbers optimizers per process: "adam_12/generator_..."
  slot = divergence.variable.split("/", 1)[1]
  assert slot.startswith("generator_dense") and slot.endswith(
      "bias_velocity"), str(report)
  assert f"{divergence.variable}[" in str(report)


class _SignallingGAN(step_models.GAN):
  """The GAN, its steps counted as they run (inside graphs too) by a
  `SignalAt` layer, which sends `signal_number` at step `at`, while
  armed."""

  def __init__(self, at, signal_number, armed, **kwargs):
    super().__init__(**kwargs)
    self.signal = loop_models.SignalAt(at, signal_number, armed)

  def train_step(self, real):
    return super().train_step(self.signal(real, training=True))


@pytest.mark.parametrize("loop, steps_per_loop, where", [
    ("eager", None, (1, 17)), ("function", None, (1, 17)),
    ("graph", 1, (1, 17)), ("graph", None, (1, 24))])
def test_a_gan_stopped_by_sigint_mid_epoch_resumes_bit_for_bit(
    loop, steps_per_loop, where, tmp_path):
  """24 steps an epoch; SIGINT at step 41 (epoch 1, step 17). The graph
  loop sees it at its next call: after the step, or the epoch. The rerun
  trains only the steps left and ends with the uninterrupted run's
  weights, both optimizers' steps and the noise's seed state, to the
  bit."""
  armed = loop_models.Switch()
  built = []

  def gan_fn():
    model = _SignallingGAN(41, signal.SIGINT, armed)
    model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3),
                  keras.losses.BinaryCrossentropy(from_logits=True))
    built.append(model)
    return model

  def run(checkpoint_dir=None):
    return training_loops.train(
        gan_fn, train_data=step_models.images_data(batch_size=2),
        loop=loop, epochs=3, seed=SEED, verbose=0,
        steps_per_loop=steps_per_loop, checkpoint_dir=checkpoint_dir)

  uninterrupted = run()
  armed.on = True
  with pytest.raises(training_loops.TrainingInterrupted,
                     match=rf"SIGINT at epoch {where[0]} \(0-based\), step "
                           rf"{where[1]}: checkpoint saved"):
    run(tmp_path)
  resumed = run(tmp_path)
  assert built[-1].signal.calls == 72 - (24 * where[0] + where[1])
  for weight, expected in zip(resumed.model.get_weights(),
                              uninterrupted.model.get_weights()):
    np.testing.assert_array_equal(weight, expected)
  for name in ("d_optimizer", "g_optimizer"):
    assert int(getattr(resumed.model, name).iterations) == 72
    for variable, expected in zip(
        getattr(resumed.model, name).variables,
        getattr(uninterrupted.model, name).variables):
      np.testing.assert_array_equal(variable.numpy(), expected.numpy())
  np.testing.assert_array_equal(resumed.history["g_loss"],
                                uninterrupted.history["g_loss"])


def _gan_callbacks(directory):
  return [
      keras.callbacks.CSVLogger(os.path.join(directory, "log.csv")),
      keras.callbacks.TensorBoard(os.path.join(directory, "tb"),
                                  update_freq=1),
      keras.callbacks.ModelCheckpoint(
          os.path.join(directory, "best.weights.h5"), monitor="g_loss",
          mode="min", save_best_only=True, save_weights_only=True),
      # A generator loss that is not falling for one epoch stops the run.
      keras.callbacks.EarlyStopping(monitor="g_loss", mode="min",
                                    patience=0, min_delta=10.0)]


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_keras_callbacks_see_a_gans_logs_as_under_fit(loop, tmp_path):
  """CSVLogger's rows, TensorBoard's batch and epoch scalars,
  ModelCheckpoint and EarlyStopping on `g_loss`, against plain fit with
  the same callbacks (one step a call, as fit's default)."""
  from test_callbacks import _scalars
  from test_keras_callbacks import _csv_rows
  fit_dir, our_dir = str(tmp_path / "fit"), str(tmp_path / "ours")
  keras.utils.set_random_seed(SEED)
  model = step_models.gan_fn()
  fit = model.fit(step_models.images_data(), epochs=3, shuffle=False,
                  verbose=0, callbacks=_gan_callbacks(fit_dir))
  ours = _trained(step_models.gan_fn, step_models.images_data, False, loop,
                  steps_per_loop=1 if loop == "graph" else None, epochs=3,
                  callbacks=_gan_callbacks(our_dir))
  assert len(fit.epoch) == 2  # the early stop happened
  assert ours.epochs == fit.epoch
  _assert_same(ours, model, fit.history, 1e-4)
  mine, theirs = (_csv_rows(os.path.join(d, "log.csv"))
                  for d in (our_dir, fit_dir))
  assert [row.keys() for row in mine] == [row.keys() for row in theirs]
  for row, expected in zip(mine, theirs):
    for key, value in expected.items():
      if value == "NA":  # fit's too: validation keys without validation
        assert row[key] == "NA", key
      else:
        np.testing.assert_allclose(float(row[key]), float(value),
                                   rtol=1e-4, err_msg=key)
  assert sorted(os.listdir(our_dir)) == sorted(os.listdir(fit_dir))
  mine, theirs = (_scalars(os.path.join(d, "tb", "train"))
                  for d in (our_dir, fit_dir))
  assert {"batch_d_loss", "batch_g_loss", "epoch_g_loss"} <= set(theirs)
  for tag, values in theirs.items():
    np.testing.assert_allclose(mine[tag], values, rtol=1e-4, atol=1e-6,
                               err_msg=tag)


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_backup_and_restore_resumes_a_gan_where_fit_does(loop, tmp_path):
  """Two epochs backed up, then a run of 3 continues with the third, as
  fit's does. (Keras' backup holds the model's weights, not a GAN's
  optimizers: fit's resumed run is the reference, not an uninterrupted
  one.)"""
  def backed_up(run, epochs, directory, begun=None):
    callbacks = [keras.callbacks.BackupAndRestore(str(directory),
                                                  delete_checkpoint=False)]
    if begun is not None:
      callbacks.append(keras.callbacks.LambdaCallback(
          on_epoch_begin=lambda epoch, logs: begun.append(epoch)))
    return _trained(step_models.gan_fn, step_models.images_data, False,
                    run, epochs=epochs, callbacks=callbacks)
  begun = {}
  for run in (loop, "keras_fit"):
    backed_up(run, 2, tmp_path / run)
    begun[run] = []
    resumed = backed_up(run, 3, tmp_path / run, begun[run])
    if run == loop:
      ours = resumed
  assert begun[loop] == begun["keras_fit"] == [2]
  assert ours.epochs == resumed.epochs == [2]
  _assert_same(ours, resumed.model, resumed.history, 1e-4)


@pytest.mark.parametrize("loop", CUSTOM_LOOPS)
def test_step_cadence_with_a_vae_keeps_the_epochs_running_logs(loop,
                                                               tmp_path):
  """Validation every 2 steps (the VAE's metrics serve training and
  validation, reset for each) and a checkpoint every 2 steps leave every
  epoch's logs as fit's, and the validation at an epoch's end is fit's."""
  model, logs = _plain_fit(step_models.vae_fn, step_models.images_data,
                           True)
  history = _trained(step_models.vae_fn, step_models.images_data, True,
                     loop, eval_every_steps=2, checkpoint_every_steps=2,
                     checkpoint_dir=tmp_path)
  _assert_same(history, model, logs, 1e-5)
  assert history.step_history["step"] == [2, 4, 6]
  np.testing.assert_allclose(history.step_history["val_loss"][2],
                             logs["val_loss"][1], rtol=1e-5)


def test_mixed_float16_with_the_step_scaling_its_loss_trains_as_fit():
  """`compile` wraps the optimizer in a `LossScaleOptimizer` under the
  policy; the step calls `optimizer.scale_loss`. The default scale, 2**15,
  overflows float16 at first: the skipped steps and the lowered scale are
  fit's."""
  from layer_harness import global_dtype_policy
  with global_dtype_policy("mixed_float16"):
    model, logs = _plain_fit(step_models.scaled_loss_fn,
                             step_models.regression_data, True)
    assert model.body.layers[0].compute_dtype == "float16"
    scale = float(model.optimizer.dynamic_scale.numpy())
    assert scale < 2.0**15
    for loop, steps_per_loop in LOOP_VARIANTS:
      history = _trained(step_models.scaled_loss_fn,
                         step_models.regression_data, True, loop,
                         steps_per_loop)
      # float16 rounds eager and graph steps apart by up to 6e-5.
      _assert_same(history, model, logs, 1e-4)
      assert float(history.model.optimizer.dynamic_scale.numpy()) == scale
