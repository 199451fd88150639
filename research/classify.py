"""The course's MLP classifier, with and without input normalization.

    python -m research.classify --dataset=mnist \
        --data_dir=../shared/data/mnist-t10k --normalize=zscore --loop=all
"""

from absl import app, flags
import keras

import losses
from research import common_flags, datasets, experiment, models

flags.DEFINE_enum("normalize", "zscore", models.NORMALIZATIONS,
                  "Input scaling fitted on the training split: none, "
                  "zscore (Standardize) or minmax (MinMaxScale).")

DEFAULTS = common_flags.Defaults(dataset="digits", epochs=20,
                                 learning_rate=0.01)


def accuracy():
  return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


def build(config):
  splits = datasets.load_for("classification", config)
  return experiment.Experiment(
      name="classify", splits=splits,
      model_fn=lambda: models.mlp_classifier(
          splits.x_train, splits.num_classes, config["normalize"]),
      loss=losses.SparseCategoricalCrossentropy(), metrics=[accuracy()],
      extra={"normalize": config["normalize"]})


main = experiment.main_for(build, DEFAULTS)

if __name__ == "__main__":
  app.run(main)
