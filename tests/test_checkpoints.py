"""Checkpoints and resume: a resumed run ends as an uninterrupted one; a
checkpoint of another model is refused by name; a damaged newest
checkpoint is moved aside and the one before it resumed."""

import logging
import os

import keras
import pytest
import tensorflow as tf

import layers
import training_loops
from loop_models import (assert_same_run, classification_data, classifier,
                         run_loop)


@pytest.mark.parametrize("loop", training_loops.LOOPS)
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(loop, tmp_path):
  def run(epochs, checkpoint_dir=None):
    keras.utils.set_random_seed(3)  # the shuffle order depends on it
    data = classification_data(shuffle=True)  # reshuffled every epoch
    return run_loop(loop, epochs=epochs, data=data,
                    checkpoint_dir=checkpoint_dir,
                    model_fn=lambda: classifier(dropout_seed=5))

  uninterrupted = run(4)
  first = run(2, tmp_path)  # "stopped" after epoch 2
  resumed = run(4, tmp_path)
  assert resumed.epochs == [0, 1, 2, 3]  # epochs 0-1 from the first call
  assert_same_run(resumed, uninterrupted, rtol=1e-5, atol=1e-6)
  # Seeded and deterministic, a rerun from scratch would end the same: the
  # steps each call trained show it resumed (4 batches an epoch).
  assert (uninterrupted.resumed_from, uninterrupted.steps_trained) == (
      None, 16)
  assert (first.resumed_from, first.steps_trained) == (None, 8)
  assert (resumed.resumed_from, resumed.steps_trained) == (
      {"epoch": 2, "step": 0}, 8)
  done = run(4, tmp_path)  # already done: nothing to run
  assert len(done.epochs) == 4
  assert (done.resumed_from, done.steps_trained) == ({"epoch": 4,
                                                      "step": 0}, 0)


def test_checkpoint_of_another_model_is_named_not_half_restored(tmp_path):
  run_loop("graph", epochs=1, model_fn=classifier, checkpoint_dir=tmp_path)
  wider = lambda: keras.Sequential([keras.Input((4,)), layers.Dense(9, "relu"),
                                    layers.Dense(3, "softmax")])
  with pytest.raises(training_loops.CheckpointMismatchError,
                     match=r"different model \(.*\[4, 8\] float32 saved, "
                           r"\[4, 9\] float32 now"):
    run_loop("graph", epochs=2, model_fn=wider, checkpoint_dir=tmp_path)


def _shuffled_run(loop, epochs, checkpoint_dir=None):
  keras.utils.set_random_seed(3)
  return run_loop(loop, epochs=epochs, data=classification_data(shuffle=True),
                  checkpoint_dir=checkpoint_dir,
                  model_fn=lambda: classifier(dropout_seed=5))


def _truncate(path):
  with open(path, "r+b") as stream:
    stream.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["truncated data", "missing index"])
def test_damaged_newest_checkpoint_moved_aside_run_resumes_from_one_before(
    tmp_path, caplog, damage):
  """Three epoch checkpoints (ckpt-1..3); the newest damaged as a full disk
  or a cut copy leaves it. The rerun warns naming it, moves its files to
  damaged/, resumes after epoch 2 and ends as an uninterrupted run."""
  uninterrupted = _shuffled_run("graph", 4)
  _shuffled_run("graph", 3, tmp_path)
  newest = tmp_path / "ckpt-3"
  if damage == "truncated data":
    _truncate(next(tmp_path.glob("ckpt-3.data-*")))
  else:
    os.remove(tmp_path / "ckpt-3.index")
  with caplog.at_level(logging.WARNING):
    resumed = _shuffled_run("graph", 4, tmp_path)
  assert f"Checkpoint {newest} is damaged" in caplog.text
  assert resumed.epochs == [0, 1, 2, 3]
  # From the one before (epoch 2's end), not from scratch.
  assert (resumed.resumed_from, resumed.steps_trained) == (
      {"epoch": 2, "step": 0}, 8)
  assert_same_run(resumed, uninterrupted, rtol=1e-5, atol=1e-6)
  aside = sorted(path.name for path in (tmp_path / "damaged").iterdir())
  assert aside and all(name.startswith("ckpt-3.") for name in aside)
  # The resumed run's own epoch-3 and -4 checkpoints follow ckpt-2.
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
  _shuffled_run("graph", 2, tmp_path)
  for data in tmp_path.glob("ckpt-*.data-*"):
    _truncate(data)
  with pytest.raises(training_loops.DamagedCheckpointError,
                     match=f"{tmp_path} holds no readable checkpoint .*"
                           "restore the directory from a copy, or delete "
                           "it to start over"):
    _shuffled_run("graph", 3, tmp_path)
  assert len(list((tmp_path / "damaged").iterdir())) == 4  # 2 x index+data


def test_damaged_files_that_cannot_be_moved_aside_are_a_write_error(
    tmp_path):
  """A file where the `damaged/` directory would go (as a read-only or full
  disk would refuse it): one line naming the checkpoint directory, not the
  OSError of the move."""
  _shuffled_run("graph", 2, tmp_path)
  _truncate(next(tmp_path.glob("ckpt-2.data-*")))
  (tmp_path / "damaged").write_text("in the way")
  with pytest.raises(training_loops.WriteError,
                     match=rf"^Could not write {tmp_path}: "):
    _shuffled_run("graph", 3, tmp_path)
  # Nothing moved: the damaged checkpoint is where it was, for a rerun.
  assert len(list(tmp_path.glob("ckpt-2.*"))) == 2


def test_the_shards_of_a_save_killed_mid_write_are_deleted(tmp_path):
  """TensorFlow writes a checkpoint's shards into ckpt-<n>_temp/ and
  renames them out: a save killed in between leaves that directory, which
  the next run deletes, and resumes from the checkpoint before."""
  _shuffled_run("graph", 2, tmp_path)
  dead = tmp_path / "ckpt-3_temp"
  dead.mkdir()
  (dead / "part-00000-of-00001.data-00000-of-00001.tempstate1").write_text(
      "half")
  resumed = _shuffled_run("graph", 3, tmp_path)
  assert not dead.exists()
  assert (resumed.resumed_from, resumed.steps_trained) == (
      {"epoch": 2, "step": 0}, 4)
