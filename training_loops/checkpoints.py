"""Checkpoints (per epoch, per cadence step, at a stop) that let `train`
resume exactly where it stopped."""

import json
import os
import re
import shutil

from absl import logging
import tensorflow as tf

from training_loops.atomic import (make_directory, replaced_atomically,
                                   write_json_atomically, writing)
from training_loops.strategies import PEER_FAILURES, is_multi_worker


class CheckpointMismatchError(ValueError):
  """The checkpoint directory holds a checkpoint of a different model."""


class DamagedCheckpointError(ValueError):
  """The checkpoint directory holds checkpoints, none of them readable."""


class CheckpointNotSharedError(ValueError):
  """The workers of a multi-worker run found different checkpoints."""


# What TensorFlow's checkpoint reader raises for a truncated or corrupt file
# (a short data file is an IndexError: "Read less bytes than requested").
_READ_ERRORS = (tf.errors.OpError, IndexError, ValueError, OSError)
_CALLBACK_STATE_KEY = "callback_state/.ATTRIBUTES/py_state"
# Where TensorFlow writes a checkpoint's shards before it renames them out:
# left behind by a save that was killed.
_DEAD_SAVE = re.compile(r"ckpt-\d+_temp")


class RunCheckpoint:
  """The training step's state (`TrainingStep.checkpoint_objects`: the
  model's variables and every optimizer, with slots and step counter; a
  `LossScaleOptimizer`'s loss scale and count of good steps too), the
  position in training (and
  the run's step count) and the `History` so far, saved after every epoch,
  every `checkpoint_every_steps` and on a stop request (the
  variables by a `tf.train.CheckpointManager`, numbered by save; the history
  as `history.json`).

  The position is the epochs done plus the steps done in the next one, with
  the running loss and metric variables of that partial epoch
  (`progress_variables`), so a run stopped mid-epoch resumes exactly. A
  `callback_state.CallbackState` (`callback_state`) adds the callbacks'
  state: restoring only reads it, for the controller to apply.

  Dropout's random state is one of the model's variables, so it is saved
  too. The order of shuffled data is replayed rather than saved: see
  `replay_data_order`.

  In a multi-worker run every worker must take part in a save; only the
  chief writes to `directory`, the others to a scratch copy they delete.
  """

  def __init__(self, directory, model, objects, strategy, history,
               progress_variables=(), max_to_keep=3, callback_state=None):
    with strategy.scope():
      self.epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False,
                                     name="epochs_done")
      self.steps_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False,
                                        name="steps_in_epoch")
      self.steps_done = tf.Variable(0, dtype=tf.int64, trainable=False,
                                    name="steps_done")
    state = dict(
        **objects,
        epochs_done=self.epochs_done, steps_in_epoch=self.steps_in_epoch,
        steps_done=self.steps_done, progress_variables=list(progress_variables))
    # Checkpoints saved before callback state was are read without it.
    self._without_callback_state = tf.train.Checkpoint(**state)
    # The callback state goes in the same files, under the same number.
    self._checkpoint = (
        self._without_callback_state if callback_state is None
        else tf.train.Checkpoint(**state, callback_state=callback_state))
    self.directory = os.fspath(directory)
    self._model = model
    self._manifest_path = os.path.join(self.directory, "variables.json")
    self._history = history
    self._history_path = os.path.join(self.directory, "history.json")
    self._scratch = None
    self._strategy = strategy
    self._multi_worker = is_multi_worker(strategy)
    self.is_writer = strategy.extended.should_checkpoint
    if not self.is_writer:
      task = strategy.cluster_resolver.task_id
      self._scratch = os.path.join(self.directory, f".worker_{task}")
    make_directory(self._scratch or self.directory)
    self._max_to_keep = max_to_keep
    self._open_managers()

  def _open_managers(self):
    """The manager saves go through (a non-chief worker's: in its scratch
    copy) and the one restores read; each lists the directory's
    checkpoints when made."""
    self._manager = tf.train.CheckpointManager(
        self._checkpoint, self._scratch or self.directory,
        max_to_keep=self._max_to_keep)
    self._reader = tf.train.CheckpointManager(
        self._checkpoint, self.directory, max_to_keep=self._max_to_keep)

  def restore(self):
    """Restores the newest readable checkpoint and its history, if any.

    A damaged newest checkpoint (a truncated or unreadable file, a missing
    variable) is logged as a warning and moved into `directory/damaged`,
    not deleted, and the next newest restored: the run then ends as an
    uninterrupted one would.

    Returns:
      `(epochs_done, steps_in_epoch, steps_done)`, the last the training
      steps of the whole run: `(0, 0, 0)` without a checkpoint.

    Raises:
      CheckpointMismatchError: the checkpoints are of another model.
      DamagedCheckpointError: none of the checkpoints is readable.
      CheckpointNotSharedError: in a multi-worker run, the workers found
        different checkpoints.
    """
    self._check_workers_agree()
    if self.is_writer:
      self._remove_dead_saves()
    if self._reader.latest_checkpoint is None:
      return 0, 0, 0
    self._check_same_model()
    self._restore_newest_readable()
    epochs_done = int(self.epochs_done.numpy())
    steps_done = int(self.steps_done.numpy())
    self._history.load(self._history_path, epochs_done, steps_done)
    return epochs_done, int(self.steps_in_epoch.numpy()), steps_done

  def _check_workers_agree(self):
    """Raises `CheckpointNotSharedError` on every worker of a multi-worker
    run whose workers see different newest checkpoints, before the restore
    (a collective, which would then run on some workers only). Each must
    read the chief's directory: one that cannot (a directory of its own, a
    file system the others do not share) would start over out of step."""
    if not self._multi_worker:
      return
    strategy = self._strategy
    latest = self._reader.latest_checkpoint
    number = -1 if latest is None else int(latest.rsplit("-", 1)[1])
    found = strategy.gather(
        strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant([number], tf.int64)), axis=0).numpy()
    if found.min() != found.max():
      others = sorted(set(found.tolist()) - {number})
      raise CheckpointNotSharedError(
          f"The workers would resume from different checkpoints (this one "
          f"{_named(number)} in {self.directory}; another "
          f"{' or '.join(map(_named, others))}): every worker must read the "
          "chief's checkpoints, so give them one checkpoint directory on a "
          "file system they share.")

  def _restore_newest_readable(self):
    """Restores the newest checkpoint that reads back whole, after moving
    newer, damaged ones aside (the chief only: the directory is its)."""
    checkpoints = list(self._reader.checkpoints)
    damaged = []
    for prefix in reversed(checkpoints):
      try:
        # A failed restore may have assigned some variables; the next one
        # assigns them all again. Every object of the run must be matched;
        # the checkpoint's own save counter, created at the next save, need
        # not be (else TensorFlow warns about it when the status goes).
        self._checkpoint_for(prefix).restore(prefix).expect_partial(
        ).assert_existing_objects_matched()
      except (*_READ_ERRORS, AssertionError) as error:
        if self._multi_worker and isinstance(error, PEER_FAILURES):
          raise  # not the files' fault: the run stops, nothing moves
        problem = str(error).strip().splitlines()[0]
        logging.warning("Checkpoint %s is damaged (%s); trying the one "
                        "before it.", prefix, problem)
        damaged.append(prefix)
      else:
        break
    else:
      prefix = None
    if damaged and self.is_writer:
      self._move_aside(damaged, prefix, checkpoints)
    if prefix is None:
      raise DamagedCheckpointError(
          f"{self.directory} holds no readable checkpoint (the damaged ones"
          f" are in {os.path.join(self.directory, 'damaged')}): restore the"
          " directory from a copy, or delete it to start over.")

  def _remove_dead_saves(self):
    """Deletes the shards of saves killed mid-write (`ckpt-<n>_temp/`): the
    directory has one writer, under its `RunLock`, so they are dead."""
    for name in os.listdir(self.directory):
      path = os.path.join(self.directory, name)
      if _DEAD_SAVE.fullmatch(name) and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)

  def _checkpoint_for(self, prefix):
    """The object to restore `prefix` into: the run's, or, for a checkpoint
    saved before callbacks' state was (a warning says so), the run's
    without it, the callbacks starting afresh."""
    if self._checkpoint is self._without_callback_state or (
        tf.train.load_checkpoint(prefix).has_tensor(_CALLBACK_STATE_KEY)):
      return self._checkpoint
    logging.warning("Checkpoint %s holds no callback state (it predates "
                    "it): the callbacks start afresh.", prefix)
    return self._without_callback_state

  def _move_aside(self, damaged, newest_good, checkpoints):
    """Moves the `damaged` checkpoints' files into `damaged/` and points the
    state file at `newest_good` (None: removes it); a move that fails (a
    read-only or full disk) is a `WriteError` naming the directory."""
    with writing(self.directory):
      self._move_files_aside(damaged, newest_good, checkpoints)
    self._open_managers()

  def _move_files_aside(self, damaged, newest_good, checkpoints):
    aside = os.path.join(self.directory, "damaged")
    os.makedirs(aside, exist_ok=True)
    for prefix in damaged:
      for name in os.listdir(self.directory):
        path = os.path.join(self.directory, name)
        if path.startswith(prefix + "."):
          os.replace(path, os.path.join(aside, name))
    kept = [prefix for prefix in checkpoints if prefix not in damaged]
    state = os.path.join(self.directory, "checkpoint")
    if newest_good is None:
      os.remove(state)
    else:
      # The CheckpointState text proto the managers read, pointing at the
      # newest good checkpoint (TensorFlow's own writer for it is a
      # deprecated v1 API).
      lines = [f'model_checkpoint_path: "{os.path.basename(newest_good)}"']
      lines += [f'all_model_checkpoint_paths: "{os.path.basename(prefix)}"'
                for prefix in kept]
      with replaced_atomically(state) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
          stream.write("\n".join(lines) + "\n")

  def save(self, epochs_done, steps_in_epoch=0, steps_done=0):
    """Saves the state after `epochs_done` epochs and `steps_in_epoch`
    steps of the next, `steps_done` in all."""
    # History first: a crash between the two leaves it one epoch ahead,
    # which `History.load` trims, never behind.
    if self.is_writer:
      write_json_atomically(self._manifest_path,
                            _variable_manifest(self._model))
      self._history.save(self._history_path)
    self.epochs_done.assign(epochs_done)
    self.steps_in_epoch.assign(steps_in_epoch)
    self.steps_done.assign(steps_done)
    # Not numbered by optimizer step: that stands still over the steps a
    # `LossScaleOptimizer` skips, and a save under an existing number
    # overwrites the last good checkpoint in place.
    # TensorFlow writes the new checkpoint's files under temporary names
    # and the manager's state file last: a failed save leaves the previous
    # one standing.
    with writing(self._manager.directory):
      self._manager.save()
    if self._scratch:
      shutil.rmtree(self._scratch, ignore_errors=True)

  def _check_same_model(self):
    """Raises `CheckpointMismatchError` naming the first differences
    between the saved model's variables and this model's.

    Shapes and dtypes are compared in order; paths only name them, since
    Keras numbers layer names per process (`dense_3` today, `dense_7` in a
    rerun of the same model)."""
    if not os.path.isfile(self._manifest_path):
      return  # left to the restore's own matching
    with open(self._manifest_path, encoding="utf-8") as stream:
      saved = json.load(stream)
    current = _variable_manifest(self._model)
    differences = [
        f"{now['path']}: {then['shape']} {then['dtype']} saved, "
        f"{now['shape']} {now['dtype']} now"
        for then, now in zip(saved, current)
        if (then["shape"], then["dtype"]) != (now["shape"], now["dtype"])]
    if len(saved) != len(current):
      differences.insert(0, f"{len(saved)} variables saved, "
                            f"{len(current)} now")
    if differences:
      raise CheckpointMismatchError(
          f"{self.directory} holds a checkpoint of a different model ("
          f"{'; '.join(differences[:4])}). Use another checkpoint "
          "directory, or delete this one.")


def _named(number):
  return "none" if number < 0 else f"ckpt-{number}"


def _variable_manifest(model):
  return [{"path": v.path, "shape": list(v.shape), "dtype": str(v.dtype)}
          for v in model.variables]


def replay_data_order(dataset, epochs_done):
  """Advances a reshuffling dataset to the order of epoch `epochs_done`.

  A seeded `shuffle(reshuffle_each_iteration=True)` draws each epoch's order
  from a seed generator that advances once per iterator created, so making
  (and discarding) one iterator per completed epoch puts a freshly built
  dataset where the interrupted run was. Creating an iterator reads no data.
  """
  for _ in range(epochs_done):
    iter(dataset)
