"""GAN (Goodfellow et al., 2014) and WGAN-GP (Gulrajani et al., 2017).

Goodfellow et al. (2014), Generative Adversarial Nets, with the
non-saturating generator loss (--objective=gan), and Gulrajani et al.
(2017), Improved Training of Wasserstein GANs (--objective=wgan_gp), on
MNIST: two networks (MLPs, or small convolutional ones), two optimizers,
the model's own step in every loop.

    python -m research gan --data_dir=../shared/data/mnist --objective=gan

Judged by the toolkit's own MNIST classifier (the classify experiment's
recipe): loaded from --judge_dir when it holds one, else trained there
first. Per loop: the classifier Inception Score and the Fréchet distance
in its last hidden layer against the test set, on --score_samples
samples, and the share of each digit; per epoch, the same scores and a grid
of samples from the same fixed noise.
"""

import dataclasses
import os
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

import training_loops
from research.experiments import classify
from research.framework import (datasets, experiment, models, run_config,
                                sample_quality)

GENERATOR_UNITS = (256, 512, 1024)
DISCRIMINATOR_UNITS = (512, 256)
CONV_FILTERS = 32
# The scores' noise and the per-epoch grid's, the same for every loop and
# epoch.
SAMPLE_SEED = 0

# Without batch normalization in the generator and dropout in the
# discriminator, the discriminator wins within an epoch and the generator
# collapses to one digit.
GAN_RECIPE = {"critic_steps": 1, "beta_1": 0.5, "beta_2": 0.999,
              "generator_batch_norm": True, "discriminator_dropout": 0.3}
# Gulrajani et al.'s MNIST settings.
WGAN_GP_RECIPE = {"critic_steps": 5, "learning_rate": 1e-4, "epochs": 20,
                  "beta_1": 0.5, "beta_2": 0.9, "generator_batch_norm": False,
                  "discriminator_dropout": 0.0}


@dataclasses.dataclass(frozen=True)
class Config(run_config.RunConfig):
  dataset: str = "mnist"
  epochs: int = 40
  # Twice Radford et al.'s rate: the averaged generator smooths what the
  # larger steps add, and the scores rise twice as fast per epoch.
  learning_rate: float = 4e-4
  optimizer: str = "adam"
  objective: str = run_config.setting(
      "gan", "gan: Goodfellow et al.'s, non-saturating; wgan_gp: Gulrajani "
      "et al.'s Wasserstein loss with a gradient penalty.",
      choices=("gan", "wgan_gp"))
  networks: str = run_config.setting(
      "mlp", "mlp: MLPs of 256-512-1024 (generator) and 512-256 "
      "(discriminator) units; conv: small DCGAN-style convolutional "
      "networks of 32 and 64 filters (slower on a CPU).",
      choices=("mlp", "conv"))
  noise_dim: int = run_config.setting(
      64, "Dimensions of the generator's Gaussian noise.", at_least=1)
  critic_steps: int | None = run_config.setting(
      None, "Discriminator (critic) updates per generator update; "
      "default: the objective's.", at_least=1)
  generator_batch_norm: bool | None = run_config.setting(
      None, "BatchNormalization before each of the generator's hidden "
      "activations; default: the objective's.")
  discriminator_dropout: float | None = run_config.setting(
      None, "Dropout after each of the discriminator's hidden layers; "
      "default: the objective's.", at_least=0, below=1)
  # Both objectives sample from the average (Yazici et al., 2019): on MNIST
  # it raises their final scores and lowers their final distances.
  generator_average: float = run_config.setting(
      0.999, "Decay of an exponential moving average of the generator's "
      "weights, updated after each generator update; samples and scores "
      "come from the averaged generator. 0: none.", at_least=0, below=1)
  penalty_weight: float = run_config.setting(
      10.0, "wgan_gp: the gradient penalty's weight (lambda).", at_least=0)
  judge_dir: str = run_config.setting(
      os.path.join("runs", "judge"), "A classify run directory holding the "
      "judging classifier (export/graph.keras, else another loop's "
      "export); trained there with classify's recipe for --dataset when "
      "absent.")
  score_samples: int = run_config.setting(
      10000, "Samples the scores are computed on, at each epoch's end and "
      "at the end.", at_least=2)

  RECIPES: ClassVar[dict] = {
      "dataset": {"mnist": {"batch_size": 64},
                  "fashion_mnist": {"batch_size": 64}},
      "objective": {"gan": GAN_RECIPE, "wgan_gp": WGAN_GP_RECIPE}}


def check(config):
  """One line for the flags the run cannot take, before anything runs."""
  datasets.check_images(config.dataset)


def build(config):
  check(config)
  raw = datasets.load(config.dataset, config.data_dir, config.seed)
  judge = sample_quality.Judge(load_judge(config), raw.x_test)
  scale = max(float(raw.x_train.max()), 1.0)
  judged_shape = raw.x_train.shape[1:]  # as the classifier takes them

  def flat(x):
    return (x.reshape(len(x), -1) / scale).astype("float32")
  splits = datasets.Splits(flat(raw.x_train), raw.y_train, flat(raw.x_val),
                           raw.y_val, flat(raw.x_test), raw.y_test,
                           num_classes=raw.num_classes)
  pixels = splits.x_train.shape[1]
  side = int(round(np.sqrt(pixels)))  # scikit-learn's digits come flat

  def model_fn(optimizer_fn):
    if config.networks == "conv":
      networks = models.conv_gan_networks(
          (side, side), config.noise_dim, CONV_FILTERS,
          batch_norm=config.generator_batch_norm,
          dropout_rate=config.discriminator_dropout, seed=config.seed)
    else:
      networks = models.gan_networks(
          pixels, config.noise_dim, GENERATOR_UNITS, DISCRIMINATOR_UNITS,
          activation="leaky_relu",
          batch_norm=config.generator_batch_norm,
          dropout_rate=config.discriminator_dropout, seed=config.seed)
    if config.objective == "wgan_gp":
      model = models.WassersteinGAN(
          *networks, config.noise_dim, seed=config.seed,
          critic_steps=config.critic_steps,
          generator_average=config.generator_average,
          penalty_weight=config.penalty_weight)
      model.compile(optimizer_fn(), optimizer_fn())
    else:
      model = models.GAN(*networks, config.noise_dim, seed=config.seed,
                         critic_steps=config.critic_steps,
                         generator_average=config.generator_average)
      model.compile(optimizer_fn(), optimizer_fn(),
                    keras.losses.BinaryCrossentropy(from_logits=True))
    # Built here rather than at the first step, which several replicas
    # cannot do (nor can fit).
    model.d_optimizer.build(model.discriminator.trainable_variables)
    model.g_optimizer.build(model.generator.trainable_variables)
    # Built for the callbacks that save weights, called for an export.
    model(tf.zeros((1, pixels)))
    return model

  def sampled(model):
    """`--score_samples` images from the fixed noise, flat, in [0, 1], and
    their scores."""
    noise = tf.random.stateless_normal(
        [config.score_samples, config.noise_dim], seed=[SAMPLE_SEED, 0])
    samples = np.asarray(model.generate(noise))
    return samples, judge.scores(samples.reshape(-1, *judged_shape) * scale)

  def evaluate(model, test_data):
    del test_data  # the judge holds the test images
    return sampled(model)[1]

  def callbacks(loop, output_dir):
    return [sample_quality.EpochScores(
        sampled, os.path.join(output_dir, f"scores_{loop}"),
        f"{config.objective}: {loop}")]

  return experiment.Experiment(
      name="gan", splits=splits, model_fn=model_fn, targets=None,
      evaluate=evaluate, callbacks=callbacks,
      loop_report=lambda history, callbacks: {
          "scores_per_epoch": callbacks[0].scores},
      run_pictures=lambda results, output_dir: sample_quality.draw_scores(
          results, output_dir, config.objective),
      extra={"objective": config.objective,
             "judge": judge_summary(config, judge, raw.y_test)})


def judge_path(judge_dir):
  """The classifier a classify run in `judge_dir` exported: its graph
  loop's, else the first loop's there; the graph loop's path when there is
  none."""
  paths = [os.path.join(judge_dir, "export", f"{loop}.keras")
           for loop in ("graph", *training_loops.LOOPS)]
  return next((path for path in paths if os.path.isfile(path)), paths[0])


def load_judge(config):
  """The classifier in `--judge_dir` (`judge_path`), trained there first
  with the classify experiment's recipe, graph loop, when absent; says
  which."""
  judge_dir = config.judge_dir
  path = judge_path(judge_dir)
  if not os.path.isfile(path):
    print(f"judge: no classifier at {path}; training classify's "
          f"{config.dataset} recipe there (graph loop).", flush=True)
    judge_config = classify.Config.resolved(
        dataset=config.dataset, data_dir=config.data_dir, loop="graph",
        output_dir=judge_dir, export_dir=os.path.join(judge_dir, "export"),
        verbose=config.verbose)
    experiment.run(classify.build(judge_config), judge_config,
                   training_loops.make_strategy("default"))
  else:
    print(f"judge: loading {path}.", flush=True)
  try:
    classifier = keras.saving.load_model(path)
  except Exception as error:  # whatever fails to load: one line
    raise datasets.DataError(
        f"--judge_dir: {path} does not load as a Keras model "
        f"({type(error).__name__}: {_first_line(error)}).") from None
  return classifier


def _first_line(error):
  lines = str(error).strip().splitlines()
  return lines[0] if lines else "no message"


def judge_summary(config, judge, labels):
  """The judge's file, its error on the test images, and the test images'
  own Inception Score and digit shares: the ceiling a generator's score is
  read against."""
  predicted = np.argmax(judge.reference_probabilities, axis=1)
  return {"path": judge_path(config.judge_dir),
          "test_error": float(np.mean(predicted != labels)),
          "real_test": judge.ceiling()}


main = experiment.main_for(build)

if __name__ == "__main__":
  run_config.run_cli(Config, main)
