"""A variational autoencoder (Kingma & Welling, 2014) on binarized MNIST.

Kingma & Welling (2014), Auto-Encoding Variational Bayes, on dynamically
binarized MNIST: an MLP encoder and decoder, a Gaussian latent and a
Bernoulli decoder, trained by the model's own step in every loop.

    python -m research vae --data_dir=../shared/data/mnist --loop=all

Reports per loop the test negative ELBO in nats per image with its
reconstruction and KL parts, and the importance-weighted estimate of the
test negative log-likelihood (Burda et al., 2016) with --nll_samples
samples per image; draws samples from the prior, test reconstructions,
the ELBO per epoch and, with --latent_dim=2, the latent manifold and the
test set's latent means coloured by digit.
"""

import dataclasses
import os
from typing import ClassVar

import numpy as np
import tensorflow as tf

from research.framework import (datasets, experiment, likelihood, models,
                                pictures, run_config)

# The test and validation images are binarized once, with seeds of their
# own: every run and seed is measured on the same binary images.
BINARIZATION_SEEDS = {"val": 1, "test": 2}
# The evaluation's noise (one draw per image for the ELBO, --nll_samples
# for the estimate), the same for every loop.
EVALUATION_SEED = 0

# 54,000 training images (the rest validate), batches of 100, Adam with a
# cosine decay from 1e-3 over the run.
MNIST_RECIPE = {"batch_size": 100, "epochs": 100, "lr_schedule": "cosine"}


@dataclasses.dataclass(frozen=True)
class Config(run_config.RunConfig):
  dataset: str = "mnist"
  learning_rate: float = 1e-3
  optimizer: str = "adam"
  latent_dim: int = run_config.setting(
      20, "Dimensions of the Gaussian latent.", at_least=1)
  hidden_units: int = run_config.setting(
      400, "Units of each of the encoder's and the decoder's two hidden "
      "layers.", at_least=1)
  nll_samples: int = run_config.setting(
      1000, "Importance samples per test image for the negative "
      "log-likelihood estimate.", at_least=1)
  nll_images: int | None = run_config.setting(
      None, "Estimate the negative log-likelihood on the first this many "
      "test images; default: all.", at_least=1)

  RECIPES: ClassVar[dict] = {
      "dataset": {"mnist": MNIST_RECIPE, "fashion_mnist": MNIST_RECIPE}}



def binarized_splits(splits):
  """The images flattened to intensities in [0, 1]; the validation and
  test images drawn once as Bernoulli pixels of their intensities, the
  training images left as intensities for the model to binarize at every
  step."""
  scale = max(splits.x_train.max(), 1.0)

  def intensities(x):
    return (x.reshape(len(x), -1) / scale).astype("float32")

  def drawn(x, split):
    x = intensities(x)
    rng = np.random.default_rng(BINARIZATION_SEEDS[split])
    return (rng.random(x.shape) < x).astype("float32")
  return datasets.Splits(
      intensities(splits.x_train), splits.y_train,
      drawn(splits.x_val, "val"), splits.y_val,
      drawn(splits.x_test, "test"), splits.y_test,
      num_classes=splits.num_classes)


def build(config):
  datasets.check_images(config.dataset)
  splits = binarized_splits(datasets.load(
      config.dataset, config.data_dir, config.seed))
  pixels = splits.x_train.shape[1]
  latent_dim = config.latent_dim

  def model_fn(optimizer_fn):
    return models.mlp_vae(pixels, latent_dim, config.hidden_units,
                          optimizer=optimizer_fn(), seed=config.seed)

  def evaluate(model, test_data):
    test = likelihood.negative_elbo(model, test_data, EVALUATION_SEED)
    if config.nll_images:
      test_data = test_data.unbatch().take(config.nll_images)
    test["nll"] = likelihood.importance_weighted_nll(
        model, test_data, config.nll_samples, EVALUATION_SEED)
    return test

  return experiment.Experiment(
      name="vae", splits=splits, model_fn=model_fn, targets=None,
      evaluate=evaluate,
      loop_pictures=lambda model, loop, output_dir: draw(
          model, splits, os.path.join(output_dir, f"{{}}_{loop}.png"),
          f"vae: {loop}"),
      run_pictures=lambda results, output_dir: pictures.curves_per_loop(
          results, ["loss", "val_loss"],
          os.path.join(output_dir, "elbo_per_epoch.png"),
          "vae: negative ELBO per epoch", "nats per image"),
      extra={"latent_dim": latent_dim})


def draw(model, splits, path, title, count=100):
  """Samples from the prior, test reconstructions, and for a 2-D latent
  the manifold and the test means by digit; `path` has a `{}` for the
  picture's name."""
  images = pictures.square
  prior = tf.random.stateless_normal([count, model.latent_dim],
                                     seed=[EVALUATION_SEED, 0])
  pictures.image_grid(images(tf.sigmoid(model.decoder(prior))),
                      path.format("samples"), f"{title}, samples from the "
                      "prior (Bernoulli means)")
  originals = splits.x_test[:count // 2]
  rows = [np.concatenate([originals[i:i + 10], model(originals[i:i + 10])])
          for i in range(0, len(originals), 10)]
  pictures.image_grid(images(np.concatenate(rows)),
                      path.format("reconstructions"),
                      f"{title}, test images and their reconstructions")
  if model.latent_dim == 2:
    # The prior's quantiles, so that the grid spans its mass evenly.
    values = tf.math.ndtri(np.linspace(0.05, 0.95, 20)).numpy()
    grid = np.asarray([[x, y] for y in values[::-1] for x in values],
                      "float32")
    pictures.image_grid(images(tf.sigmoid(model.decoder(grid))),
                        path.format("manifold"),
                        f"{title}, decoded latent grid", columns=20)
    means, _ = model.encode(splits.x_test)
    pictures.scatter_by_label(means, splits.y_test, path.format("latents"),
                              f"{title}, test latent means by digit")


main = experiment.main_for(build)

if __name__ == "__main__":
  run_config.run_cli(Config, main)
