"""research.experiments.vae: the bounds against NumPy and closed forms, and
the script end to end on tiny settings."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import SHARED, fast_dev_run_keeps_nothing, needs_shared
from research.experiments import vae
from research.framework import likelihood, models
from research.tools import compare

PIXELS, LATENT = 16, 3


@pytest.fixture(scope="module")
def small_vae():
  tf.keras.utils.set_random_seed(3)
  return models.mlp_vae(PIXELS, LATENT, units=8, hidden_layers=2)


def _mlp(network, x):
  """The network's Dense layers in NumPy: relu between them."""
  dense = [layer for layer in network.layers if layer.get_weights()]
  for index, layer in enumerate(dense):
    kernel, bias = layer.get_weights()
    x = x @ kernel + bias
    if index < len(dense) - 1:
      x = np.maximum(x, 0.0)
  return x


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _numpy_log_weights(model, images, noise):
  """log p(x|z) + log p(z) - log q(z|x), written out."""
  mean, log_variance = np.split(_mlp(model.encoder, images), 2, axis=1)
  z = mean[:, None] + np.exp(0.5 * log_variance)[:, None] * noise
  logits = _mlp(model.decoder, z)
  log_likelihood = np.sum(images[:, None] * _log_sigmoid(logits)
                          + (1 - images[:, None]) * _log_sigmoid(-logits),
                          axis=-1)
  log_normal = -0.5 * np.log(2 * np.pi)
  log_prior = np.sum(log_normal - 0.5 * z ** 2, axis=-1)
  log_posterior = np.sum(log_normal - 0.5 * noise ** 2
                         - 0.5 * log_variance[:, None], axis=-1)
  return log_likelihood + log_prior - log_posterior, mean, log_variance


def _binary_images(count, seed=0):
  return (np.random.default_rng(seed).random((count, PIXELS)) < 0.4).astype(
      "float32")


def test_the_negative_elbo_is_numpys_on_a_batch(small_vae):
  images = _binary_images(6)
  noise = np.random.default_rng(1).standard_normal((6, LATENT)).astype(
      "float32")
  reconstruction, kl = small_vae.terms(images, noise)
  log_weights, mean, log_variance = _numpy_log_weights(
      small_vae, images, noise[:, None])
  expected_kl = 0.5 * np.sum(mean ** 2 + np.exp(log_variance) - 1
                             - log_variance, axis=1)
  np.testing.assert_allclose(kl, expected_kl, rtol=1e-5, atol=1e-6)
  # One sample's log weight is the ELBO's integrand: -(reconstruction) +
  # log p(z) - log q(z|x), whose mean over q is -(reconstruction + KL).
  z = mean + np.exp(0.5 * log_variance) * noise
  log_ratio = (np.sum(-0.5 * z ** 2, axis=1)
               - np.sum(-0.5 * noise ** 2 - 0.5 * log_variance, axis=1))
  np.testing.assert_allclose(-np.asarray(reconstruction) + log_ratio,
                             log_weights[:, 0], rtol=1e-5, atol=1e-4)


def test_log_weights_are_numpys(small_vae):
  images = _binary_images(4)
  noise = np.random.default_rng(2).standard_normal((4, 7, LATENT)).astype(
      "float32")
  expected, _, _ = _numpy_log_weights(small_vae, images, noise)
  np.testing.assert_allclose(likelihood.log_weights(small_vae, images, noise),
                             expected, rtol=1e-5, atol=1e-4)


def test_both_bounds_are_exact_when_the_posterior_is_the_prior():
  # Zero weights: q(z|x) = N(0, I) = p(z) and p(x|z) = Bernoulli(sigmoid(b))
  # whatever z, so every importance weight is p(x) itself.
  model = models.mlp_vae(PIXELS, LATENT, units=8, hidden_layers=1)
  bias = np.linspace(-2.0, 2.0, PIXELS).astype("float32")
  for network in (model.encoder, model.decoder):
    for layer in network.layers:
      layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
  model.decoder.layers[-1].set_weights(
      [np.zeros((8, PIXELS), "float32"), bias])
  images = _binary_images(30)
  log_p = np.sum(images * _log_sigmoid(bias)
                 + (1 - images) * _log_sigmoid(-bias), axis=1)
  data = tf.data.Dataset.from_tensor_slices(images).batch(7)
  bound = likelihood.negative_elbo(model, data)
  assert bound["kl"] == pytest.approx(0.0, abs=1e-6)
  assert bound["neg_elbo"] == pytest.approx(-log_p.mean(), rel=1e-6)
  for samples in (1, 50):
    assert likelihood.importance_weighted_nll(
        model, data, samples, images_per_call=4) == pytest.approx(
            -log_p.mean(), rel=1e-5)


def test_more_samples_tighten_the_estimate(small_vae):
  data = tf.data.Dataset.from_tensor_slices(_binary_images(40)).batch(10)
  estimates = [likelihood.importance_weighted_nll(small_vae, data, k)
               for k in (1, 10, 200)]
  assert estimates[0] > estimates[1] > estimates[2]
  # k = 1 is a one-sample negative ELBO: its mean is within noise of it.
  elbo = likelihood.negative_elbo(small_vae, data)["neg_elbo"]
  assert estimates[0] == pytest.approx(elbo, rel=0.02)


def test_training_binarizes_afresh_at_every_step():
  model = models.mlp_vae(PIXELS, LATENT, units=8, hidden_layers=1)
  seen = []
  terms = model.terms
  model.terms = lambda images, noise: (seen.append(np.asarray(images))
                                       or terms(images, noise))
  intensities = np.full((200, PIXELS), 0.3, "float32")
  model.run_eagerly = True
  model.fit(intensities, epochs=2, batch_size=200, verbose=0)
  first, second = seen
  assert set(np.unique(first)) == {0.0, 1.0}
  assert abs(first.mean() - 0.3) < 0.02
  assert (first != second).mean() > 0.3


def _results(output_dir):
  with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as f:
    return json.load(f)


def test_the_script_reports_each_loops_bounds_and_draws(tmp_path):
  vae.main(
      vae.Config.resolved(
          dataset="digits",
          epochs=2,
          limit_batches=3,
          latent_dim=2,
          nll_samples=20,
          loop="all",
          verbose=0,
          output_dir=str(tmp_path)))
  results = _results(tmp_path)
  assert results["experiment"] == "vae" and results["own_step"]
  fit = results["loops"]["keras_fit"]
  for loop, report in results["loops"].items():
    test = report["test"]
    assert set(test) == {"neg_elbo", "reconstruction", "kl", "nll"}
    assert test["neg_elbo"] == pytest.approx(
        test["reconstruction"] + test["kl"], rel=1e-6)
    assert set(report["history"]) >= {"loss", "reconstruction", "kl",
                                      "val_loss"}
    # Every loop trains the model's own step as fit does.
    np.testing.assert_allclose(report["history"]["loss"],
                               fit["history"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(test["nll"], fit["test"]["nll"], rtol=1e-4)
    for picture in ("samples", "reconstructions", "manifold", "latents"):
      assert os.path.isfile(tmp_path / f"{picture}_{loop}.png"), picture
  assert os.path.isfile(tmp_path / "elbo_per_epoch.png")
  assert os.path.isdir(tmp_path / "checkpoints" / "graph")


def test_a_rerun_with_another_latent_size_is_refused(tmp_path, capsys):
  settings = dict(dataset="digits", epochs=1, limit_batches=1, loop="graph",
                  nll_samples=2, verbose=0, output_dir=str(tmp_path))
  vae.main(vae.Config.resolved(**settings))
  with pytest.raises(SystemExit) as exit_:
    vae.main(vae.Config.resolved(**settings, latent_dim=5))
  assert "latent_dim: 20 then, 5 now" in str(exit_.value)


@needs_shared
@pytest.mark.parametrize("settings,message", [
    (dict(dataset="diabetes"), "--dataset=diabetes is not an image dataset"),
    (dict(dataset="mnist", data_dir=os.path.join(SHARED, "california-housing")),
     "has no mnist IDX files"),
])
def test_bad_data_is_one_line_before_anything_is_written(tmp_path, settings,
                                                         message):
  with pytest.raises(SystemExit) as exit_:
    vae.main(vae.Config.resolved(**settings, output_dir=str(tmp_path / "run")))
  assert message in str(exit_.value) and "\n" not in str(exit_.value)
  assert not os.path.exists(tmp_path / "run")


def test_compare_traces_the_vaes_own_step(capsys):
  compare.compare(
      "vae",
      compare.EXPERIMENTS["vae"].Config.resolved(
          dataset="digits", batch_size=16),
      trace_loops=True,
      trace_steps=3)
  assert ("eager, function, graph and keras_fit agree over 3 steps"
          in capsys.readouterr().out)


def test_fast_dev_run_trains_every_loop_and_keeps_nothing(tmp_path, capsys):
  fast_dev_run_keeps_nothing(vae, tmp_path / "run", capsys,
                             dataset="digits", nll_samples=5)
