"""How good a generator's digits are, judged by an MNIST classifier: the
classifier Inception Score (Salimans et al., 2016, with our classifier in
Inception's place), the Fréchet distance between the features of its last
hidden layer on samples and on the test set (Heusel et al., 2017, likewise),
and the share of each digit among the samples; `EpochScores`, a callback
that scores a generator's samples at each epoch's end."""

import dataclasses
import json
import os

import keras
import numpy as np

import training_loops
from research.framework import pictures

# The samples each epoch's grid shows.
GRID_SAMPLES = 100


def inception_score(probabilities):
  """`exp(E_x KL(p(y|x) || p(y)))` of class probabilities `[n, classes]`,
  with `p(y)` their mean: from 1 (every sample alike, or each undecided) to
  the number of classes (each sample certain, the classes equally often)."""
  probabilities = np.asarray(probabilities, np.float64)
  marginal = probabilities.mean(axis=0)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = probabilities * (np.log(probabilities) - np.log(marginal))
  return float(np.exp(np.nansum(terms, axis=1).mean()))


def frechet_distance(features, reference):
  """The Fréchet distance between Gaussians fitted to two sets of features
  `[n, d]`: `|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`."""
  mean1, mean2 = np.mean(features, axis=0), np.mean(reference, axis=0)
  covariance1 = np.cov(features, rowvar=False)
  covariance2 = np.cov(reference, rowvar=False)
  # tr((S1 S2)^(1/2)) is the sum of the roots of S1 S2's eigenvalues,
  # which are those of S1^(1/2) S2 S1^(1/2): real and >= 0 but for
  # rounding.
  eigenvalues = np.linalg.eigvals(covariance1 @ covariance2).real
  trace_of_root = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
  return float(np.sum(np.square(mean1 - mean2)) + np.trace(covariance1)
               + np.trace(covariance2) - 2.0 * trace_of_root)


def digit_shares(probabilities, classes=10):
  """The share of samples the classifier assigns to each class."""
  predicted = np.argmax(probabilities, axis=1)
  return (np.bincount(predicted, minlength=classes) / len(predicted)).tolist()


@dataclasses.dataclass
class Judge:
  """An MNIST classifier that scores images against the real test set.

  Attributes:
    classifier: a Keras model from images `[n, 28, 28]` of pixel values
      0-255 to class probabilities.
    reference_images: the real test images, in the same form.
  """
  classifier: keras.Model
  reference_images: np.ndarray

  def __post_init__(self):
    # The last hidden layer's output: the input of the output layer.
    self.features_model = keras.Model(self.classifier.inputs,
                                      self.classifier.layers[-1].input)
    self.reference_features = self.features(self.reference_images)
    self.reference_probabilities = self.probabilities(self.reference_images)

  def probabilities(self, images):
    return np.asarray(self.classifier.predict(images, batch_size=1000,
                                              verbose=0))

  def features(self, images):
    return np.asarray(self.features_model.predict(images, batch_size=1000,
                                                  verbose=0))

  def scores(self, images):
    """`{"inception_score", "fid", "min_digit_share", "max_digit_share",
    "digit_shares"}` of `images`."""
    probabilities = self.probabilities(images)
    shares = digit_shares(probabilities)
    return {"inception_score": inception_score(probabilities),
            "fid": frechet_distance(self.features(images),
                                    self.reference_features),
            "min_digit_share": min(shares), "max_digit_share": max(shares),
            "digit_shares": shares}

  def ceiling(self):
    """The real test set's own Inception Score, and its digit shares."""
    return {"inception_score": inception_score(self.reference_probabilities),
            "digit_shares": digit_shares(self.reference_probabilities)}


class EpochScores(keras.callbacks.Callback):
  """At each epoch's end: the scores of the samples from the fixed noise,
  recorded in `scores` (and kept in `<prefix>.json`, so a resumed run keeps
  the earlier epochs'), and a grid of the first of them,
  `<prefix>/epoch_NNN.png`, the same noise at every epoch."""

  def __init__(self, sampled, prefix, title):
    super().__init__()
    self.sampled, self.prefix, self.title = sampled, prefix, title
    self.scores = {"epoch": [], "inception_score": [], "fid": []}
    if os.path.isfile(f"{prefix}.json"):
      with open(f"{prefix}.json", encoding="utf-8") as stream:
        self.scores = json.load(stream)

  def on_epoch_end(self, epoch, logs=None):
    samples, scores = self.sampled(self.model)
    os.makedirs(self.prefix, exist_ok=True)
    pictures.image_grid(
        pictures.square(samples[:GRID_SAMPLES]),
        os.path.join(self.prefix, f"epoch_{epoch + 1:03d}.png"),
        f"{self.title}, epoch {epoch + 1}")
    # A resumed run redoes the epochs after its checkpoint: theirs replace
    # what the interrupted run recorded.
    kept = [i for i, done in enumerate(self.scores["epoch"]) if done < epoch]
    self.scores = {key: [values[i] for i in kept]
                   + [epoch if key == "epoch" else scores[key]]
                   for key, values in self.scores.items()}
    training_loops.write_json_atomically(f"{self.prefix}.json", self.scores)


def draw_scores(results, output_dir, objective):
  """The Inception Score and the Fréchet distance per epoch, every loop."""
  for key, label in (("inception_score", "Inception Score (judge)"),
                     ("fid", "Fréchet distance to the test set")):
    pictures.curves_per_loop(
        results, [key], os.path.join(output_dir, f"{key}_per_epoch.png"),
        f"{objective}: {label} per epoch", label,
        source="scores_per_epoch")
