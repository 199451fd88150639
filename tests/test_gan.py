"""research.experiments.gan: the judge's scores against closed forms, the
WGAN-GP step against a hand-written one, the averaged generator against
NumPy, and the script end to end on tiny settings."""

import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import training_loops
from conftest import fast_dev_run_keeps_nothing
from research.experiments import gan
from research.framework import models, run_config, sample_quality
from research.tools import compare

def test_inception_score_spans_one_to_the_number_of_classes():
  certain = np.eye(10)[np.arange(1000) % 10]
  assert sample_quality.inception_score(certain) == pytest.approx(10.0)
  # One class only, or every sample undecided: no information.
  assert sample_quality.inception_score(np.eye(10)[np.zeros(50, int)]) == (
      pytest.approx(1.0))
  assert sample_quality.inception_score(np.full((50, 10), 0.1)) == (
      pytest.approx(1.0))
  # Two classes equally often, each sample 0.9 sure: exp(KL) in closed
  # form, KL = 0.9 log(0.9 / 0.5) + 0.1 log(0.1 / 0.5).
  unsure = np.array([[0.9, 0.1], [0.1, 0.9]] * 20)
  expected = np.exp(0.9 * np.log(1.8) + 0.1 * np.log(0.2))
  assert sample_quality.inception_score(unsure) == pytest.approx(expected)


def test_frechet_distance_is_the_closed_form_between_gaussians():
  rng = np.random.default_rng(0)
  # Samples whose empirical means and covariances are exactly these:
  # whitened draws, scaled and shifted.
  def exact(mean, scales, count=400):
    draws = rng.standard_normal((count, len(mean)))
    draws -= draws.mean(axis=0)
    draws = draws @ np.linalg.inv(np.linalg.cholesky(
        np.cov(draws, rowvar=False))).T
    return draws * scales + mean
  a = exact(np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 0.5]))
  b = exact(np.array([1.0, 1.0, 0.0]), np.array([3.0, 1.0, 0.5]))
  # Diagonal covariances: |dmu|^2 + sum (s1 - s2)^2.
  expected = (1 + 0 + 4) + (4 + 1 + 0)
  assert sample_quality.frechet_distance(a, b) == pytest.approx(expected,
                                                                rel=1e-9)
  assert sample_quality.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
  # Rotating both sets alike changes no distance.
  rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
  assert sample_quality.frechet_distance(a @ rotation, b @ rotation) == (
      pytest.approx(expected, rel=1e-9))


def test_digit_shares_count_the_predicted_classes():
  probabilities = np.eye(10)[[0, 0, 1, 9]] * 0.8 + 0.02
  assert sample_quality.digit_shares(probabilities) == pytest.approx(
      [0.5, 0.25] + [0.0] * 7 + [0.25])


@pytest.mark.parametrize("networks", ["mlp", "conv"])
def test_the_wgan_gp_critic_loss_is_the_papers(networks):
  tf.keras.utils.set_random_seed(1)
  pixels, nets = {
      "mlp": (6, lambda: models.gan_networks(6, 2, (5,), (4,))),
      "conv": (16, lambda: models.conv_gan_networks((4, 4), 2, 3))}[networks]
  model = models.WassersteinGAN(*nets(), 2, critic_steps=1,
                                penalty_weight=10.0)
  real = np.random.default_rng(0).random((8, pixels)).astype("float32")
  fake = np.random.default_rng(1).random((8, pixels)).astype("float32")
  state = model.seed_generator.state.numpy()
  loss = float(model.discriminator_loss(real, fake))
  # The same interpolation draw, then the penalty by hand: the critic's
  # input gradient taken by a separate tape, its norm over each image.
  model.seed_generator.state.assign(state)
  mix = keras.random.uniform((8, 1), seed=model.seed_generator)
  between = tf.constant(real + np.asarray(mix) * (fake - real))
  with tf.GradientTape() as tape:
    tape.watch(between)
    critic = model.discriminator(between)
  norms = np.linalg.norm(tape.gradient(critic, between), axis=1)
  expected = (np.mean(model.discriminator(fake)) -
              np.mean(model.discriminator(real)) +
              10.0 * np.mean((norms - 1.0) ** 2))
  assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("regularized", [False, True])
def test_the_conv_networks_map_flat_noise_to_flat_images_and_back(
    regularized):
  discriminator, generator = models.conv_gan_networks(
      (8, 12), 5, 4, batch_norm=regularized,
      dropout_rate=0.3 if regularized else 0.0)
  images = np.asarray(generator(np.ones((3, 5), "float32")))
  assert images.shape == (3, 96)
  assert images.min() >= 0 and images.max() <= 1  # a sigmoid
  assert discriminator(images).shape == (3, 1)
  with pytest.raises(ValueError, match="multiples of 4"):
    models.conv_gan_networks((28, 30))


def _averaged_gan(decay=0.9):
  """A small GAN with batch normalization in its generator (moving
  statistics to average too), its optimizers built."""
  discriminator, generator = models.gan_networks(
      16, 4, (8,), (8,), batch_norm=True, seed=1)
  model = models.GAN(discriminator, generator, 4, seed=1,
                     generator_average=decay)
  model.compile(keras.optimizers.Adam(1e-2), keras.optimizers.Adam(1e-2),
                keras.losses.BinaryCrossentropy(from_logits=True))
  model(tf.zeros((1, 16)))
  return model


class _GeneratorStates(keras.callbacks.Callback):
  """The generator's weights after each batch."""

  def __init__(self):
    super().__init__()
    self.states = []

  def on_train_batch_end(self, batch, logs=None):
    self.states.append(self.model.generator.get_weights())


def _averages(model):
  """The model's averages in the order of its generator's `weights`."""
  averages = {id(variable): average.numpy()
              for variable, average in model.averaged_variables()}
  return [averages[id(variable)] for variable in model.generator.weights]


@pytest.mark.filterwarnings("ignore:`compile\\(\\)` was not called")
def test_the_averaged_generator_is_the_moving_average_and_draws_the_samples(
    tmp_path):
  """Each generator update moves every average by (1 - decay) towards the
  generator's variables, from their initial values (NumPy over the eager
  loop's per-step states); `generate` draws with the averages, in every
  loop as in fit; a resumed run and an exported model keep them."""
  data = tf.data.Dataset.from_tensor_slices(np.random.default_rng(0).uniform(
      size=(32, 16)).astype("float32")).batch(8)
  keras.utils.set_random_seed(3)  # train's seed: the initial weights
  expected = _averaged_gan().generator.get_weights()
  recorded = _GeneratorStates()
  runs = {loop: training_loops.train(
      _averaged_gan, train_data=data, loop=loop, epochs=2, seed=3,
      verbose=0, callbacks=[recorded] if loop == "eager" else [])
      for loop in training_loops.LOOPS}
  assert len(recorded.states) == 8
  for state in recorded.states:
    expected = [0.9 * average + 0.1 * value
                for average, value in zip(expected, state)]
  noise = np.random.default_rng(1).normal(size=(5, 4)).astype("float32")
  model = runs["eager"].model
  averages = _averages(model)
  assert len(averages) == len(expected) == 8  # two Dense's 4, the BN's 4
  for got, value in zip(averages, expected):
    np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-7)
  samples = {loop: np.asarray(run.model.generate(noise))
             for loop, run in runs.items()}
  averaged = keras.models.clone_model(model.generator)
  averaged.set_weights(averages)
  np.testing.assert_allclose(samples["eager"], np.asarray(
      averaged(noise, training=False)), rtol=1e-6)
  assert not np.allclose(samples["eager"], model.generator(noise,
                                                           training=False))
  for loop in ("function", "graph"):
    np.testing.assert_array_equal(samples[loop], samples["keras_fit"])
  np.testing.assert_allclose(samples["eager"], samples["keras_fit"],
                             atol=1e-4)
  for epochs in (1, 2):  # the second resumes the first's checkpoint
    resumed = training_loops.train(
        _averaged_gan, train_data=data, loop="graph", epochs=epochs, seed=3,
        verbose=0, checkpoint_dir=tmp_path / "checkpoints")
  assert resumed.resumed_from == {"epoch": 1, "step": 0}
  np.testing.assert_array_equal(np.asarray(resumed.model.generate(noise)),
                                samples["graph"])
  runs["graph"].model.save(tmp_path / "gan.keras")
  reloaded = keras.models.load_model(tmp_path / "gan.keras")
  np.testing.assert_array_equal(np.asarray(reloaded.generate(noise)),
                                samples["graph"])


def _results(output_dir):
  with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def digits_judge(tmp_path_factory):
  """A judge trained once by research.experiments.classify's digits recipe."""
  return str(tmp_path_factory.mktemp("judge"))


@pytest.mark.parametrize("objective", ["gan", "wgan_gp"])
def test_the_script_scores_every_loop_and_draws_each_epoch(
    tmp_path, digits_judge, objective, capsys):
  gan.main(
      gan.Config.resolved(
          dataset="digits",
          objective=objective,
          epochs=2,
          limit_batches=2,
          score_samples=200,
          loop="all",
          judge_dir=digits_judge,
          verbose=0,
          output_dir=str(tmp_path)))
  printed = capsys.readouterr().out
  assert "judge: " in printed
  results = _results(tmp_path)
  assert results["objective"] == objective and results["own_step"]
  judge = results["judge"]
  assert judge["test_error"] < 0.1
  assert judge["real_test"]["inception_score"] > 6.5  # 6.95 measured
  recipe = {"gan": (1, 4e-4, 0.999, True, 0.3),
            "wgan_gp": (5, 1e-4, 0.9, False, 0.0)}[objective]
  flags_ = results["flags"]
  assert (flags_["critic_steps"], flags_["learning_rate"], flags_["beta_2"],
          flags_["generator_batch_norm"], flags_["discriminator_dropout"]
          ) == recipe and flags_["beta_1"] == 0.5
  assert flags_["generator_average"] == 0.999
  fit = results["loops"]["keras_fit"]
  for loop, report in results["loops"].items():
    test = report["test"]
    assert 1.0 <= test["inception_score"] <= 10.0
    assert test["fid"] > 0
    assert sum(test["digit_shares"]) == pytest.approx(1.0)
    assert test["min_digit_share"] == min(test["digit_shares"])
    # Every loop trains the model's own step as fit does.
    np.testing.assert_allclose(report["history"]["d_loss"],
                               fit["history"]["d_loss"], rtol=1e-4)
    np.testing.assert_allclose(test["inception_score"],
                               fit["test"]["inception_score"], rtol=1e-3)
    scores = report["scores_per_epoch"]
    assert scores["epoch"] == [0, 1]
    assert scores["inception_score"][-1] == pytest.approx(
        test["inception_score"])
    for epoch in (1, 2):
      assert os.path.isfile(tmp_path / f"scores_{loop}" /
                            f"epoch_{epoch:03d}.png")
  for picture in ("inception_score_per_epoch.png", "fid_per_epoch.png"):
    assert os.path.isfile(tmp_path / picture)


def test_the_judge_is_the_graph_loops_export_else_another_loops(tmp_path):
  export = tmp_path / "export"
  assert gan.judge_path(str(tmp_path)) == str(export / "graph.keras")
  export.mkdir()
  (export / "function.keras").touch()
  assert gan.judge_path(str(tmp_path)) == str(export / "function.keras")
  (export / "graph.keras").touch()
  assert gan.judge_path(str(tmp_path)) == str(export / "graph.keras")


def test_a_judge_that_does_not_load_is_one_line_before_anything_is_written(
    tmp_path):
  export = tmp_path / "judge" / "export"
  export.mkdir(parents=True)
  (export / "graph.keras").write_text("not a model")
  with pytest.raises(SystemExit) as exit_:
    gan.main(
        gan.Config.resolved(
            dataset="digits",
            judge_dir=str(tmp_path / "judge"),
            output_dir=str(tmp_path / "run")))
  message = str(exit_.value)
  assert "graph.keras does not load as a Keras model" in message
  assert "\n" not in message
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("settings,message", [
    (dict(dataset="mnist", data_dir=os.path.dirname(__file__)),
     "has no mnist IDX files"),
    (dict(dataset="diabetes"), "--dataset=diabetes is not an image dataset"),
    (dict(discriminator_dropout=1.0),
     "--discriminator_dropout=1.0 is out of range; accepted: >= 0 and < 1."),
])
def test_bad_data_or_settings_are_one_line_before_anything_is_written(
    tmp_path, settings, message):
  # Refused by the config (a value out of range) or the run's checks.
  with pytest.raises((SystemExit, run_config.SettingsError)) as exit_:
    gan.main(
        gan.Config.resolved(
            **{"dataset": "digits", **settings},
            judge_dir=str(tmp_path / "judge"),
            output_dir=str(tmp_path / "run")))
  assert message in str(exit_.value) and "\n" not in str(exit_.value)
  assert not os.path.exists(tmp_path / "run")
  assert not os.path.exists(tmp_path / "judge")


def test_betas_are_refused_for_another_optimizer(tmp_path, digits_judge):
  with pytest.raises(SystemExit) as exit_:
    gan.main(
        gan.Config.resolved(
            dataset="digits",
            optimizer="sgd",
            beta_1=0.5,
            judge_dir=digits_judge,
            output_dir=str(tmp_path / "run")))
  assert "--beta_1 is for --optimizer=adam or adamw, not sgd" in str(
      exit_.value)


def test_compare_traces_the_wgan_gps_own_step(capsys, digits_judge):
  compare.compare(
      "gan",
      compare.EXPERIMENTS["gan"].Config.resolved(
          dataset="digits", objective="wgan_gp", judge_dir=digits_judge),
      trace_loops=True,
      trace_steps=3)
  assert ("eager, function, graph and keras_fit agree over 3 steps"
          in capsys.readouterr().out)


def test_fast_dev_run_trains_conv_wgan_gp_in_every_loop_and_keeps_nothing(
    tmp_path, digits_judge, capsys):
  # The penalty's second derivative through convolutions, in every loop.
  fast_dev_run_keeps_nothing(gan, tmp_path / "run", capsys,
                             dataset="digits", networks="conv",
                             objective="wgan_gp", score_samples=50,
                             judge_dir=digits_judge)


def test_the_script_trains_on_two_replicas(tmp_path, digits_judge, capsys,
                                           mirrored):
  """Its two optimizers built with the networks (either objective's, by
  the same code): a step cannot create them under two replicas."""
  del mirrored  # the CPU split in two, as --cpu_replicas=2 asks
  gan.main(gan.Config.resolved(
      dataset="digits", objective="wgan_gp", strategy="mirrored",
      cpu_replicas=2, loop="graph", fast_dev_run=True, score_samples=50,
      judge_dir=digits_judge, verbose=0, output_dir=str(tmp_path / "run")))
  assert re.search(r"^ *graph +[0-9]", capsys.readouterr().out, re.M)
