"""Wide & deep regression (Cheng et al., 2016) three ways: a functional
model, the same as a subclass, and a two-input model (wide = features 0-4,
deep = features 2-7) with an optional auxiliary output (loss weights
0.9 / 0.1).

    python -m research wide_deep --dataset=california_housing \
        --data_dir=../shared/data/california-housing \
        --wide_deep_variant=multi_input --aux_output
"""

from absl import app, flags
import keras

import losses
from research.framework import common_flags, datasets, experiment, models

flags.DEFINE_enum("wide_deep_variant", "functional",
                  ("functional", "subclassed", "multi_input"),
                  "How the model is written.")
flags.DEFINE_boolean("aux_output", False, "multi_input only: add the "
                     "auxiliary output on the deep path.")

# The course trains wide & deep at 1e-3: the wide path feeds raw (scaled)
# features with heavy tails straight to the output, and 1e-2 diverges.
DEFAULTS = common_flags.Defaults(dataset="diabetes", epochs=30,
                                 learning_rate=1e-3)


def build(config):
  splits = datasets.load_for("regression", config)
  if splits.x_train.shape[1] < 8:
    raise ValueError("wide & deep needs at least 8 features.")
  variant, aux = config["wide_deep_variant"], config["aux_output"]
  if aux and variant != "multi_input":
    raise app.UsageError("--aux_output needs --wide_deep_variant="
                         "multi_input.")
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


main = experiment.main_for(build, DEFAULTS)

if __name__ == "__main__":
  app.run(main)
