"""The course's MLP classifier, with and without input normalization.

    python -m research classify --dataset=mnist \\
        --data_dir=../shared/data/mnist-t10k --normalize=zscore --loop=all
"""

import dataclasses
from typing import ClassVar

import keras

import losses
from research.framework import datasets, experiment, models, run_config

# The full MNIST's recipe (and Fashion-MNIST's, the same format): min-max
# scaled pixels (z-scores blow up the rarely inked border pixels), AdamW
# with a cosine schedule to 0, and dropout.
MNIST_RECIPE = {"normalize": "minmax", "optimizer": "adamw",
                "learning_rate": 1e-3, "weight_decay": 0.05,
                "lr_schedule": "cosine", "epochs": 20, "dropout_rate": 0.2}


@dataclasses.dataclass(frozen=True)
class Config(run_config.RunConfig):
  dataset: str = "digits"
  normalize: str = run_config.setting(
      "zscore", "Input scaling fitted on the training split: none, zscore "
      "(Standardize) or minmax (MinMaxScale).",
      choices=models.NORMALIZATIONS)
  dropout_rate: float = run_config.setting(
      0.0, "Dropout after each hidden layer.", at_least=0, below=1)

  RECIPES: ClassVar[dict] = {
      "dataset": {"mnist": MNIST_RECIPE, "fashion_mnist": MNIST_RECIPE}}


def accuracy():
  return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


def build(config):
  splits = datasets.load_for("classification", config)
  return experiment.Experiment(
      name="classify", splits=splits,
      model_fn=lambda: models.mlp_classifier(
          splits.x_train, splits.num_classes, config.normalize,
          dropout_rate=config.dropout_rate, seed=config.seed),
      loss=losses.SparseCategoricalCrossentropy(), metrics=[accuracy()],
      extra={"normalize": config.normalize})


main = experiment.main_for(build)

if __name__ == "__main__":
  run_config.run_cli(Config, main)
