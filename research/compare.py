"""The main job: one experiment with all four loops on the same data and
seed, side by side with model.fit.

    python -m research.compare                          # classify on digits
    python -m research.compare --experiment=regress --dataset=california_housing \
        --data_dir=../shared/data/california-housing

Prints per loop the final train loss, validation and test metrics, steps/s,
the speed ratio to keras_fit and whether the final loss matches keras_fit.
"""

import dataclasses

from absl import app, flags

from research import (callbacks, classify, deep_net, experiment, regress,
                      wide_deep)

EXPERIMENTS = {"classify": classify, "callbacks": callbacks,
               "regress": regress, "deep_net": deep_net,
               "wide_deep": wide_deep}

flags.DEFINE_enum("experiment", "classify", tuple(EXPERIMENTS),
                  "Which experiment to compare the loops on.")

FLAGS = flags.FLAGS


def main(argv):
  script = EXPERIMENTS[FLAGS.experiment]
  defaults = dataclasses.replace(script.DEFAULTS, loop="all")
  experiment.main_for(script.build, defaults, flags_of=[__name__])(argv)


if __name__ == "__main__":
  app.run(main)
