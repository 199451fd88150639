"""The course's regression MLP, trained with MSE.

Standardize -> Dense(30, relu) -> Dense(1), MSE, SGD. Reports test MSE
(the test loss).

    python -m research regress --dataset=california_housing \\
        --data_dir=../shared/data/california-housing
"""

import dataclasses

import keras

import losses
from research.framework import datasets, experiment, models, run_config

@dataclasses.dataclass(frozen=True)
class Config(run_config.RunConfig):
  dataset: str = "diabetes"
  epochs: int = 30



def build(config):
  splits = datasets.load_for("regression", config)
  return experiment.Experiment(
      name="regress", splits=splits,
      model_fn=lambda: models.regressor(splits.x_train),
      loss=losses.MeanSquaredError(),
      metrics=[keras.metrics.MeanAbsoluteError(name="mae")])


main = experiment.main_for(build)

if __name__ == "__main__":
  run_config.run_cli(Config, main)
