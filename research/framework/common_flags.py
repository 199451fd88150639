"""Flags every research script shares; defined once per process.

Defaults left as None are filled in by each experiment (`Defaults`). A
script's `main` turns the flags into one config (`resolved`) that everything
below it takes; nothing else reads `FLAGS`.
"""

import dataclasses

from absl import flags

import training_loops
from research.framework import datasets

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
                   "Peak learning rate (after any warm-up); default: the "
                   "experiment's.")
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

# -- the optimizer (research.framework.optimizers builds it) ---------------------------
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop",
              "adagrad")
LR_SCHEDULES = ("constant", "exponential", "piecewise", "cosine")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

flags.DEFINE_enum("optimizer", None, OPTIMIZERS,
                  "Optimizer: sgd, momentum (SGD with momentum), nesterov, "
                  "adam, adamw, rmsprop or adagrad; default: the "
                  "experiment's.")
flags.DEFINE_float("momentum", None, "Momentum of --optimizer=momentum or "
                   "nesterov, in [0, 1); default 0.9.")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (Keras' "
                   "`weight_decay`: each step subtracts learning_rate * "
                   "weight_decay * weight), >= 0.")
flags.DEFINE_enum("lr_schedule", "constant", LR_SCHEDULES,
                  "Learning-rate schedule after the warm-up: constant, "
                  "exponential (x decay_rate every decay_steps), piecewise "
                  "(lr_values between lr_boundaries) or cosine (to 0 over "
                  "decay_steps).")
flags.DEFINE_integer("warmup_steps", 0, "Linear warm-up from 0 to "
                     "--learning_rate over this many steps, then the "
                     "schedule.", lower_bound=0)
flags.DEFINE_integer("decay_steps", None, "exponential: steps per "
                     "decay_rate factor (default: one epoch); cosine: steps "
                     "from peak to 0 (default: the rest of the run).",
                     lower_bound=1)
flags.DEFINE_float("decay_rate", None, "exponential: the factor per "
                   "decay_steps, in (0, 1]; default 0.9.")
flags.DEFINE_list("lr_boundaries", None, "piecewise: the steps (after the "
                  "warm-up) where the learning rate changes, increasing.")
flags.DEFINE_list("lr_values", None, "piecewise: the learning rates, one "
                  "more than --lr_boundaries; the first replaces "
                  "--learning_rate.")
flags.DEFINE_enum("precision", "float32", PRECISIONS,
                  "Keras dtype policy; mixed_float16 also wraps the optimizer "
                  "in a LossScaleOptimizer, as model.fit does.")
flags.DEFINE_float("clipnorm", None, "Clip the gradient, summed over "
                   "replicas, to this global norm (> 0).")
flags.DEFINE_float("ema_momentum", 0.0, "Keep an exponential moving average "
                   "of the weights with this momentum, in [0, 1), and end "
                   "training on it; 0: off.")
flags.DEFINE_integer("gradient_accumulation_steps", 1, "Apply the optimizer "
                     "once per this many batches, with their mean gradient.",
                     lower_bound=1)

# -- step cadence, dev runs, determinism -------------------------------------
flags.DEFINE_integer("eval_every_steps", None, "Also validate every this "
                     "many training steps (counted over the run), logged by "
                     "step.", lower_bound=1)
flags.DEFINE_integer("checkpoint_every_steps", None, "Also checkpoint every "
                     "this many training steps, so a crash loses at most "
                     "that many (custom loops).", lower_bound=1)
flags.DEFINE_boolean("fast_dev_run", False, "One batch of training, "
                     "validation and test per loop, in a temporary "
                     "directory removed at the end: a check that every code "
                     "path runs, in seconds.")
flags.DEFINE_integer("limit_batches", None, "Use at most this many batches "
                     "of each split per epoch.", lower_bound=1)
flags.DEFINE_integer("overfit_batches", None, "Train on the same first N "
                     "batches every epoch, unshuffled: the loss should fall "
                     "to about zero.", lower_bound=1)
flags.DEFINE_boolean("deterministic", False, "TensorFlow op determinism: "
                     "two runs with the same flags give bitwise-identical "
                     "histories (slower).")


@dataclasses.dataclass(frozen=True)
class Defaults:
  """An experiment's values for the flags left unset.

  `datasets` maps a dataset to its own recipe: flag values used when the
  flag is not given on the command line (any flag of the config, e.g.
  classify's tuned MNIST optimizer, schedule and dropout). `choices` maps
  another flag to a recipe per value, applied likewise after the
  dataset's (e.g. research.experiments.gan's `{"objective": {"wgan_gp": {...}}}`).
  """
  dataset: str
  loop: str = "all"
  epochs: int = 20
  learning_rate: float = 0.01
  optimizer: str = "sgd"
  datasets: dict = dataclasses.field(default_factory=dict)
  choices: dict = dataclasses.field(default_factory=dict)


class SettingsError(ValueError):
  """The flags conflict: with each other, with the data, or with the run
  already in the output directory. The message is one line."""


def resolved(defaults, *modules, given=None, command_line=True):
  """The config a script runs with, a dict for run_config.json and
  results.json: the shared flags with `defaults` filled in, then every flag
  that `modules` (module names: a script passes its `__name__`) define;
  then the dataset's recipe in `defaults.datasets` for the flags not
  given.

  Flags are taken by the module that defines them, so a process that
  imports every script (tests, `compare`) gives each only its own, and
  absl's own flags (`--verbosity`, ...) are in no config.

  `given`: flag values taken as if given on the command line, for a script
  that runs other scripts' experiments (`research.tools.report`).
  `command_line` False: the flags' defaults, not this process's command
  line, with `given` on top (an experiment that runs another's recipe
  unchanged, as research.experiments.gan trains its judge).
  """
  given = dict(given or {})
  values = {flag.name: flag.value if command_line else flag.default
            for module in (__name__, *modules)
            for flag in FLAGS.get_flags_for_module(module)}
  unknown = set(given) - set(values)
  if unknown:
    raise ValueError(f"No such flags here: {', '.join(sorted(unknown))}.")
  values.update(given)
  for field in dataclasses.fields(defaults):
    if (field.name not in ("datasets", "choices")
        and values[field.name] is None):
      values[field.name] = getattr(defaults, field.name)
  recipes = [defaults.datasets.get(values["dataset"], {}),
             *(by_value.get(values[flag], {})
               for flag, by_value in defaults.choices.items())]
  for recipe in recipes:
    for name, value in recipe.items():
      if name not in given and (not command_line
                                or FLAGS[name].using_default_value):
        values[name] = value
  return values
