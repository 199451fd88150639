"""Evaluates a saved `.keras` model on a dataset's test split.

    python -m research evaluate --model_path=runs/export/graph.keras \\
        --dataset=digits

Models load in Keras' safe mode: a file that carries Python code (a Lambda
layer's function) is refused unless --unsafe_deserialization says the file
is trusted.
"""

import dataclasses
import os
import sys

import keras
import numpy as np

# `optimizers` registers the learning-rate schedules a saved model's
# optimizer may hold.
from research.framework import (datasets, optimizers,  # noqa: F401
                                run_config)


@dataclasses.dataclass(frozen=True)
class Config(run_config.Settings):
  model_path: str | None = run_config.setting(
      None, "A .keras file to evaluate.")
  unsafe_deserialization: bool = run_config.setting(
      False, "Allow the file's Python code (Lambda layers) to run. Only for "
      "files you trust.")
  dataset: str = run_config.setting("digits", "Dataset.",
                                    choices=datasets.DATASETS)
  data_dir: str | None = run_config.setting(
      None, "Directory with the dataset's files; see ../shared/data.")
  seed: int = run_config.setting(42, "Seeds the split (as the run that "
                                 "trained the model).", at_least=0)
  batch_size: int = run_config.setting(32, "Batch size.", at_least=1)


class ModelFileError(ValueError):
  """The model file is missing, unreadable or refused."""


def load_model(path, unsafe_deserialization=False):
  """Loads a `.keras` file, in safe mode unless told otherwise."""
  if not path or not path.endswith(".keras"):
    raise ModelFileError(f"--model_path must name a .keras file, got "
                         f"{path!r}.")
  if not os.path.isfile(path):
    raise ModelFileError(f"Model file not found: {path}")
  try:
    return keras.models.load_model(path,
                                   safe_mode=not unsafe_deserialization)
  except ValueError as error:
    if "safe_mode" in str(error):
      raise ModelFileError(
          f"{path} contains Python code (e.g. a Lambda layer's function) "
          "that safe mode will not run. Pass --unsafe_deserialization only "
          "if you trust the file.") from None
    raise ModelFileError(f"{path} could not be loaded: "
                         f"{str(error).strip().splitlines()[0]}") from None


def evaluate(model, splits, batch_size):
  """Test accuracy (classification) or MSE (regression) from predictions."""
  predictions = model.predict(splits.x_test, batch_size=batch_size,
                              verbose=0)
  if splits.num_classes:
    return {"accuracy": float(np.mean(
        predictions.argmax(axis=-1) == splits.y_test))}
  return {"mse": float(np.mean(np.square(
      predictions.reshape(-1) - splits.y_test)))}


def main(config):
  """Prints the test scores of the model `config` names."""
  try:
    model = load_model(config.model_path,
                       config.unsafe_deserialization)
    splits = datasets.load(config.dataset, config.data_dir,
                           config.seed)
  except (ModelFileError, datasets.DataError) as error:
    sys.exit(f"error: {error}")
  scores = evaluate(model, splits, config.batch_size)
  print(" ".join(f"test {name}: {value:.4f}"
                 for name, value in scores.items()))


if __name__ == "__main__":
  run_config.run_cli(Config, main)
