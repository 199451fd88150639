"""Wide & deep regression (Cheng et al., 2016), written three ways.

A functional model, the same as a subclass, and a two-input model (wide =
features 0-4, deep = features 2-7) with an optional auxiliary output (loss
weights 0.9 / 0.1).

    python -m research wide_deep --dataset=california_housing \\
        --data_dir=../shared/data/california-housing \\
        --wide_deep_variant=multi_input --aux_output
"""

import dataclasses

import keras

import losses
from research.framework import datasets, experiment, models, run_config

@dataclasses.dataclass(frozen=True)
class Config(run_config.RunConfig):
  dataset: str = "diabetes"
  epochs: int = 30
  # The course trains wide & deep at 1e-3: the wide path feeds raw (scaled)
  # features with heavy tails straight to the output, and 1e-2 diverges.
  learning_rate: float = 1e-3
  wide_deep_variant: str = run_config.setting(
      "functional", "How the model is written.",
      choices=("functional", "subclassed", "multi_input"))
  aux_output: bool = run_config.setting(
      False, "multi_input only: add the auxiliary output on the deep path.")



def build(config):
  splits = datasets.load_for("regression", config)
  if splits.x_train.shape[1] < 8:
    raise datasets.DataError(
        f"{config.dataset} has {splits.x_train.shape[1]} features; wide & "
        "deep needs at least 8.")
  variant, aux = config.wide_deep_variant, config.aux_output
  if aux and variant != "multi_input":
    raise run_config.SettingsError(
        f"--aux_output is for --wide_deep_variant=multi_input, not "
        f"{variant}; accepted: multi_input, or no --aux_output.")
  builders = {
      "functional": lambda: models.wide_deep_functional(splits.x_train),
      "subclassed": lambda: models.wide_deep_subclassed(splits.x_train),
      "multi_input": lambda: models.wide_deep_multi_input(
          splits.x_train, aux_output=aux)}
  mae = keras.metrics.MeanAbsoluteError(name="mae")
  spec = dict(loss=losses.MeanSquaredError(), metrics=[mae])
  if variant == "multi_input":
    spec["inputs"] = models.split_wide_deep
  if aux:
    spec = dict(
        loss={"main": losses.MeanSquaredError(),
              "aux": losses.MeanSquaredError()},
        loss_weights={"main": 0.9, "aux": 0.1}, metrics={"main": [mae]},
        inputs=models.split_wide_deep,
        targets=lambda y: {"main": y, "aux": y})
  return experiment.Experiment(
      name="wide_deep", splits=splits, model_fn=builders[variant],
      extra={"variant": variant, "aux_output": aux}, **spec)


main = experiment.main_for(build)

if __name__ == "__main__":
  run_config.run_cli(Config, main)
