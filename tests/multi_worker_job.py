"""One worker of the multi-worker test: trains, prints its results as JSON.

    TF_CONFIG='{"cluster": ..., "task": ...}' python multi_worker_job.py LOOP
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import losses  # noqa: E402
import training_loops  # noqa: E402
from loop_models import classification_data, classifier, sgd  # noqa: E402


def run(loop, strategy=None):
  """The run both the workers and the single-process reference make."""
  # A dataset's shuffle order depends on the global seed when it is built.
  keras.utils.set_random_seed(3)
  return training_loops.train(
      lambda: classifier(batch_norm=False), sgd(),
      losses.SparseCategoricalCrossentropy(),
      classification_data(shuffle=True), loop=loop, epochs=2,
      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
      strategy=strategy, seed=3, verbose=0)


if __name__ == "__main__":
  strategy = training_loops.make_strategy("multi_worker")
  history = run(sys.argv[1], strategy)
  print(json.dumps({"history": history.history,
                    "replicas": strategy.num_replicas_in_sync}))
