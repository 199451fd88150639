"""The main job: one experiment with all four loops on the same data and
seed, side by side with model.fit.

    python -m research compare                          # classify on digits
    python -m research compare --experiment=regress --dataset=california_housing \
        --data_dir=../shared/data/california-housing
    python -m research compare --trace --loop=graph --trace_steps=20
    python -m research compare --experiment=distill --trace --loop=eager \
        --dataset=mnist --data_dir=../shared/data/mnist --trace_steps=100

Prints per loop the final train loss, validation and test metrics, steps/s,
the speed ratio to keras_fit and whether the final loss matches keras_fit.
With --trace, it instead trains the loops in lockstep on the same training
batches and prints the first step and variable where one parts from the
first (`training_loops.compare`); that writes nothing. distill's
comparison is research.experiments.distill's own three runs; its trace follows the
distilled student's step, under an untrained teacher.
"""

import dataclasses
import sys

from absl import app, flags
import keras

import training_loops
from research.experiments import (classify, deep_net, distill, early_stopping,
                                  gan, regress, vae, wide_deep)
from research.framework import common_flags, experiment

EXPERIMENTS = {"classify": classify, "early_stopping": early_stopping,
               "regress": regress, "deep_net": deep_net,
               "wide_deep": wide_deep, "vae": vae, "gan": gan,
               "distill": distill}

flags.DEFINE_enum("experiment", "classify", tuple(EXPERIMENTS),
                  "Which experiment to compare the loops on.")

# A trace trains nothing a rerun resumes and writes nothing, so these flags
# stay out of run_config.json, which records the flags this module defines:
# they are defined under a module name of their own, and declared key flags
# so that --help still lists them.
_TRACE_MODULE = f"{__name__}.trace"
flags.DEFINE_boolean(
    "trace", False, "Instead of the table: train the loops in lockstep on "
    "the same training batches and print the first step and variable where "
    "one parts from the first. --loop=all: every loop; one loop: it and "
    "keras_fit.",
    module_name=_TRACE_MODULE)
flags.DEFINE_integer("trace_steps", None, "Steps --trace compares; default: "
                     "one epoch.", lower_bound=1, module_name=_TRACE_MODULE)
flags.declare_key_flag("trace")
flags.declare_key_flag("trace_steps")

FLAGS = flags.FLAGS


def main(argv):
  script = EXPERIMENTS[FLAGS.experiment]
  defaults = dataclasses.replace(script.DEFAULTS, loop="all")
  if FLAGS.trace:
    trace(script, defaults, argv, FLAGS.trace_steps)
  elif script is distill:  # a teacher, then the students in every loop
    distill.main(argv, defaults)
  else:
    experiment.main_for(script.build, defaults, flags_of=[__name__])(argv)


def trace(script, defaults, argv, steps):
  """Prints `training_loops.compare` of the loops `--loop` selects on
  `steps` batches of the experiment's training split, built as
  `experiment.run` builds it; exits with one line for bad flags or data."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = common_flags.resolved(defaults, script.__name__, __name__)
  experiment.configure_process(config)
  strategy = experiment.strategy_for(config)
  if config["loop"] == "keras_fit":
    sys.exit("error: --trace compares --loop with keras_fit; choose another "
             "loop, or all.")
  loops = [loop for loop in training_loops.LOOPS
           if config["loop"] in ("all", loop) or loop == "keras_fit"]
  seed = config["seed"]
  try:
    built = script.build(config)
    plan = experiment.RunPlan.checked(built, config, strategy, loops)
    keras.utils.set_random_seed(seed)  # before the data: it seeds the shuffle
    with experiment.dtype_policy(config["precision"]):
      report = training_loops.compare(
          **plan.step_arguments(built), data=plan.dataset(built, "train"),
          loops=loops, steps=steps, strategy=strategy, seed=seed)
  except experiment.ONE_LINE_ERRORS as error:
    sys.exit(f"error: {error}")
  print(report)


if __name__ == "__main__":
  app.run(main)
