"""The course's regression MLP: Standardize -> Dense(30, relu) -> Dense(1),
MSE, SGD. Reports test MSE (the test loss).

    python -m research regress --dataset=california_housing \
        --data_dir=../shared/data/california-housing
"""

from absl import app
import keras

import losses
from research.framework import common_flags, datasets, experiment, models

DEFAULTS = common_flags.Defaults(dataset="diabetes", epochs=30,
                                 learning_rate=0.01)


def build(config):
  splits = datasets.load_for("regression", config)
  return experiment.Experiment(
      name="regress", splits=splits,
      model_fn=lambda: models.regressor(splits.x_train),
      loss=losses.MeanSquaredError(),
      metrics=[keras.metrics.MeanAbsoluteError(name="mae")])


main = experiment.main_for(build, DEFAULTS)

if __name__ == "__main__":
  app.run(main)
