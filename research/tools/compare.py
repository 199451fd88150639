"""The main job: every loop on one experiment, side by side with fit.

One experiment with all four loops on the same data and seed.

    python -m research compare                          # classify on digits
    python -m research compare --experiment=regress \\
        --dataset=california_housing \\
        --data_dir=../shared/data/california-housing
    python -m research compare --trace --loop=graph --trace_steps=20
    python -m research compare --experiment=distill --trace --loop=eager \\
        --dataset=mnist --data_dir=../shared/data/mnist --trace_steps=100

Prints per loop the final train loss, validation and test metrics, steps/s,
the speed ratio to keras_fit and whether the final loss matches keras_fit.
With --trace, it instead trains the loops in lockstep on the same training
batches and prints the first step and variable where one parts from the
first (`training_loops.compare`); that writes nothing. distill's
comparison is the distill experiment's own three runs; its trace follows
the distilled student's step, under an untrained teacher.
"""

import functools
import importlib
import sys

from absl import app, flags
import keras

import research
import training_loops
from research.framework import experiment, run_config

# Every experiment that trains the loops side by side (hparam_search
# trains one loop per trial).
EXPERIMENTS = {name: importlib.import_module(f"research.experiments.{name}")
               for name in research.EXPERIMENTS if name != "hparam_search"}

flags.DEFINE_enum("experiment", "classify", tuple(EXPERIMENTS),
                  "Which experiment to compare the loops on; its flags "
                  "follow.")
flags.DEFINE_boolean(
    "trace", False, "Instead of the table: train the loops in lockstep on "
    "the same training batches and print the first step and variable where "
    "one parts from the first. --loop=all: every loop; one loop: it and "
    "keras_fit.")
flags.DEFINE_integer("trace_steps", None, "Steps --trace compares; default: "
                     "one epoch.", lower_bound=1)

FLAGS = flags.FLAGS


def compare(name, config, trace_loops=False, trace_steps=None):
  """Experiment `name` run with `config` (its module's `Config`): every
  loop `config.loop` selects, side by side; or, with `trace_loops`, their
  lockstep trace over `trace_steps` batches (`trace`)."""
  script = EXPERIMENTS[name]
  if trace_loops:
    experiment.main_running(
        functools.partial(trace, script, steps=trace_steps),
        partial_results=None)(config)
  else:  # distill's main trains a teacher first
    script.main(config)


def trace(script, config, strategy, steps):
  """Prints `training_loops.compare` of the loops `config.loop` selects on
  `steps` batches of the experiment's training split, built as
  `experiment.run` builds it; writes nothing."""
  if config.loop == "keras_fit":
    raise run_config.SettingsError(
        "--trace compares --loop with keras_fit; choose another loop, or "
        "all.")
  loops = [loop for loop in training_loops.LOOPS
           if config.loop in ("all", loop) or loop == "keras_fit"]
  built = script.build(config)
  plan = experiment.RunPlan.checked(built, config, strategy, loops)
  keras.utils.set_random_seed(config.seed)  # before the data: the shuffle
  with experiment.dtype_policy(config.precision):
    print(training_loops.compare(
        **plan.step_arguments(built), data=plan.dataset(built, "train"),
        loops=loops, steps=steps, strategy=strategy, seed=config.seed))


def _experiment_named(argv):
  """The `--experiment` of a command line, before absl parses it: its
  config's flags are defined only then."""
  for index, argument in enumerate(argv):
    if argument.startswith("--experiment="):
      return argument.split("=", 1)[1]
    if argument == "--experiment" and index + 1 < len(argv):
      return argv[index + 1]
  return FLAGS["experiment"].default


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.experiment != _experiment_named(sys.argv):
    sys.exit(f"error: --experiment={FLAGS.experiment} came in a way this "
             "command does not read before parsing (a flag file, or twice); "
             "pass it once, as --experiment=<name>.")
  config_class = EXPERIMENTS[FLAGS.experiment].Config
  try:
    config = config_class.from_flags()
  except run_config.SettingsError as error:
    sys.exit(f"error: {error}")
  compare(FLAGS.experiment, config, FLAGS.trace, FLAGS.trace_steps)


if __name__ == "__main__":
  chosen = _experiment_named(sys.argv)
  if chosen in EXPERIMENTS:  # else absl's parse says what is accepted
    EXPERIMENTS[chosen].Config.define_flags(module_name=sys.argv[0])
  app.run(main)
