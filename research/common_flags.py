"""Flags every research script shares; defined once per process.

Defaults left as None are filled in by each experiment (`Defaults`). A
script's `main` turns the flags into one config (`resolved`) that everything
below it takes; nothing else reads `FLAGS`.
"""

import dataclasses

from absl import flags

import training_loops
from research import datasets

FLAGS = flags.FLAGS

flags.DEFINE_enum("dataset", None, datasets.DATASETS,
                  "Dataset; default: the experiment's.")
flags.DEFINE_enum("loop", None, (*training_loops.LOOPS, "all"),
                  "Training loop, or 'all' to run them side by side; "
                  "default: the experiment's.")
flags.DEFINE_integer("epochs", None, "Epochs; default: the experiment's.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "Global batch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", None,
                   "SGD learning rate; default: the experiment's.")
flags.DEFINE_integer("seed", 42, "Seeds the split, weights, dropout and "
                     "data order.", lower_bound=0)
flags.DEFINE_enum("strategy", "default", training_loops.STRATEGIES,
                  "tf.distribute strategy.")
flags.DEFINE_integer("cpu_replicas", None, "With --strategy=mirrored: split "
                     "the CPU into this many replicas.", lower_bound=1)
flags.DEFINE_string("data_dir", None, "Directory with the dataset's files "
                    "(IDX files, cal_housing.csv); see ../shared/data.")
flags.DEFINE_string("output_dir", None, "Where results.json, TensorBoard "
                    "logs, checkpoints and plots go; default: "
                    "runs/<experiment>. A rerun with the same directory "
                    "resumes from its checkpoints.")
flags.DEFINE_string("export_dir", None, "Export each trained model there "
                    "as a SavedModel (<export_dir>/<loop>).")
flags.DEFINE_integer("verbose", 2, "0 silent, 1 progress bars, 2 a line "
                     "per epoch.", lower_bound=0, upper_bound=2)

flags.register_validator("learning_rate", lambda v: v is None or v > 0,
                         message="--learning_rate must be positive.")


@dataclasses.dataclass(frozen=True)
class Defaults:
  """An experiment's values for the flags left unset."""
  dataset: str
  loop: str = "all"
  epochs: int = 20
  learning_rate: float = 0.01


def resolved(defaults, *modules):
  """The config a script runs with, a dict for run_config.json and
  results.json: the shared flags with `defaults` filled in, then every flag
  that `modules` (module names: a script passes its `__name__`) define.

  Flags are taken by the module that defines them, so a process that
  imports every script (tests, `compare`) gives each only its own, and
  absl's own flags (`--verbosity`, ...) are in no config."""
  values = {flag.name: flag.value
            for module in (__name__, *modules)
            for flag in FLAGS.get_flags_for_module(module)}
  for field in dataclasses.fields(defaults):
    if values[field.name] is None:
      values[field.name] = getattr(defaults, field.name)
  return values
