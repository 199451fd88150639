"""One worker of the multi-worker tests: trains, prints its results as JSON.

    TF_CONFIG='{"cluster": ..., "task": ...}' python multi_worker_job.py \
        LOOP [EPOCHS [CHECKPOINT_DIR [PAUSE_SECONDS [DYING_WORKER]]]]

With LOOP written `gan:LOOP[,LOOP...]`, it trains `step_models`' GAN (its
own `train_step`) instead of the classifier, in each loop in turn. Prints
a JSON list: one run's results per loop. Worker DYING_WORKER SIGKILLs
itself as its checkpoint restore begins, before the restore's collective
(the workers' agreement on the checkpoint).

Exits 3 with the error on stderr when it loses its peer.
"""

import json
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import losses  # noqa: E402
import step_models  # noqa: E402
import training_loops  # noqa: E402
from training_loops import checkpoints  # noqa: E402
from loop_models import (  # noqa: E402
    classification_data, recorded_classifier, sgd)

# The `ShardRecorder` of each model `run` builds.
RECORDERS = []


class _Pause(keras.callbacks.Callback):
  """Slows epochs down so a test can kill a worker mid-run."""

  def __init__(self, seconds):
    super().__init__()
    self.seconds = seconds

  def on_epoch_end(self, epoch, logs=None):
    time.sleep(self.seconds)


def run(loop, strategy=None, epochs=2, checkpoint_dir=None, pause=0.0):
  """The run both the workers and the single-process reference make."""
  # A dataset's shuffle order depends on the global seed when it is built.
  keras.utils.set_random_seed(3)
  return training_loops.train(
      lambda: recorded_classifier(RECORDERS), sgd(),
      losses.SparseCategoricalCrossentropy(),
      classification_data(shuffle=True), loop=loop, epochs=epochs,
      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
      strategy=strategy, checkpoint_dir=checkpoint_dir,
      callbacks=[_Pause(pause)] if pause else [], seed=3, verbose=0)


def run_gan(loop, strategy=None, epochs=2):
  """The GAN, trained by its own step: both workers and the one-process
  reference."""
  return training_loops.train(
      step_models.gan_fn, train_data=step_models.images_data(), loop=loop,
      epochs=epochs, strategy=strategy, seed=3, verbose=0)


def _die_in_restore():
  """Makes this worker's `RunCheckpoint` SIGKILL the process when it starts
  to restore: its peers are left waiting in the restore's collective."""
  def die(self):
    os.kill(os.getpid(), signal.SIGKILL)
  checkpoints.RunCheckpoint._check_workers_agree = die


if __name__ == "__main__":
  strategy = training_loops.make_strategy("multi_worker")
  arguments = sys.argv[1:] + [None] * 5
  if arguments[4] is not None and (
      int(arguments[4]) == strategy.cluster_resolver.task_id):
    _die_in_restore()
  model, _, loops = arguments[0].rpartition(":")
  try:
    if model == "gan":
      histories = [run_gan(loop, strategy, epochs=int(arguments[1] or 2))
                   for loop in loops.split(",")]
    else:
      histories = [run(loops, strategy, epochs=int(arguments[1] or 2),
                       checkpoint_dir=arguments[2],
                       pause=float(arguments[3] or 0))]
  except training_loops.WorkerLostError as error:
    print(error, file=sys.stderr)
    sys.exit(3)
  print(json.dumps([{"history": history.history,
                     "resumed_from": history.resumed_from,
                     "steps_trained": history.steps_trained,
                     "replicas": strategy.num_replicas_in_sync,
                     "seen": RECORDERS[-1].seen(strategy) if RECORDERS
                     else None,
                     "weights": [weights.tolist() for weights
                                 in history.model.get_weights()]}
                    for history in histories]))
