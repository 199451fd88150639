"""Trains the hand-written layers and loss on scikit-learn's digits.

    python -m research.demo --epochs=10 --seed=0
"""

from absl import app, flags
import keras
import numpy as np
from sklearn import datasets, model_selection

import layers
import losses

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 10, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", 0.05, "SGD learning rate.",
                   lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "Seed for the split, weights and dropout.")


def build_classifier(num_features, num_classes, train_features, seed):
  """Standardize -> Dense(64, relu) -> BatchNorm -> Dropout -> softmax."""
  standardize = layers.Standardize()
  standardize.adapt(train_features)
  return keras.Sequential([
      keras.Input((num_features,)), standardize,
      layers.Dense(64, "relu"), layers.BatchNormalization(),
      layers.Dropout(0.2, seed=seed), layers.Dense(num_classes, "softmax")])


def main(argv):
  del argv
  keras.utils.set_random_seed(FLAGS.seed)
  digits = datasets.load_digits()
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      digits.data.astype("float32"), digits.target, test_size=0.2,
      stratify=digits.target, random_state=FLAGS.seed)
  model = build_classifier(x_train.shape[1], 10, x_train, FLAGS.seed)
  model.compile(keras.optimizers.SGD(FLAGS.learning_rate),
                losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
  model.fit(x_train, y_train, batch_size=FLAGS.batch_size,
            epochs=FLAGS.epochs, verbose=2)
  test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
  print(f"digits test: loss {test_loss:.4f}, accuracy {test_accuracy:.4f} "
        f"({len(y_test)} examples, chance {1 / len(np.unique(y_test)):.2f})")


if __name__ == "__main__":
  app.run(main)
