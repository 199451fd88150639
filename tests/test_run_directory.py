"""Run-directory integrity: one run at a time in a directory,
a lock left by a dead run taken over, and a failed write that ends the run
with one line and leaves what was written before intact. (Damaged
checkpoints: test_checkpoints; multi-worker output: test_multi_worker.)"""

import errno
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys

import keras
import matplotlib.figure
import numpy as np
import pytest
import tensorflow as tf

import training_loops
from conftest import REPO
from loop_models import assert_same_run, run_loop
from research.experiments import classify

def _classify(output_dir, **flag_values):
  """classify's main on digits, one graph-loop epoch; a one-line error is
  a SystemExit with its text."""
  classify.main(
      classify.Config.resolved(
          **{
              "loop": "graph",
              "epochs": 1,
              "verbose": 0,
              "output_dir": str(output_dir),
              **flag_values
          }))


def _files(directory):
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, _, names in os.walk(directory) for name in names)


def _read(path):
  with open(path, "rb") as stream:
    return stream.read()


# -- the lock ---------------------------------------------------------------

def _start_holder(*directories):
  """A process that takes the run lock of each of `directories` and
  sleeps; returns once it holds them."""
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time\n"
       "from training_loops.run_lock import RunLock\n"
       "for directory in sys.argv[1:]:\n"
       "  RunLock(directory).__enter__()\n"
       "print('held', flush=True)\n"
       "time.sleep(600)\n", *map(str, directories)],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  assert holder.stdout.readline().strip() == "held"
  return holder


def _stop(holder):
  holder.kill()  # SIGKILL: no chance to release anything
  holder.wait()


@pytest.fixture(scope="module")
def held(tmp_path_factory):
  """Two directories another live process holds: (its PID, directories)."""
  directories = [tmp_path_factory.mktemp(f"held_{i}") for i in range(2)]
  holder = _start_holder(*directories)
  yield holder.pid, directories
  _stop(holder)


def test_a_held_checkpoint_dir_refuses_train_naming_the_holder(held):
  pid, (directory, _) = held
  with pytest.raises(training_loops.RunLockedError) as refusal:
    run_loop("graph", checkpoint_dir=directory)
  message = str(refusal.value)
  assert message.startswith(f"{directory} is in use by the run of PID "
                            f"{pid} on {socket.gethostname()}, started ")
  assert "\n" not in message
  assert _files(directory) == ["run.lock"]  # refused before anything ran


def test_a_held_output_dir_refuses_a_second_script_run(held):
  pid, (_, directory) = held
  with pytest.raises(SystemExit) as refusal:
    _classify(directory)
  assert str(refusal.value).startswith(
      f"error: {directory} is in use by the run of PID {pid}")
  assert _files(directory) == ["run.lock"]


def test_a_process_asking_again_for_a_directory_it_holds_is_refused(
    tmp_path):
  # flock would refuse it too, but NFS's per-process locks would not (and
  # the inner release would drop the outer lock).
  with training_loops.RunLock(tmp_path):
    with pytest.raises(training_loops.RunLockedError,
                       match=f"^{tmp_path} is in use by this process "
                             rf"already \(PID {os.getpid()}\)"):
      run_loop("graph", checkpoint_dir=tmp_path)
  with training_loops.RunLock(tmp_path):  # released, whole
    pass


def test_a_finished_run_releases_its_locks(tmp_path):
  _classify(tmp_path)
  for directory in (tmp_path, tmp_path / "checkpoints" / "graph"):
    assert _read(directory / "run.lock") == b""  # no holder to take over
    with training_loops.RunLock(directory):
      pass


def test_an_interrupted_run_releases_its_lock(tmp_path):
  with pytest.raises(training_loops.TrainingInterrupted):
    run_loop("graph", epochs=3, checkpoint_dir=tmp_path,
             callbacks=[_SignalAtEpochEnd(0)])
  assert _read(tmp_path / "run.lock") == b""
  with training_loops.RunLock(tmp_path):
    pass


class _SignalAtEpochEnd(keras.callbacks.Callback):

  def __init__(self, epoch):
    super().__init__()
    self.epoch = epoch

  def on_epoch_end(self, epoch, logs=None):
    if epoch == self.epoch:
      os.kill(os.getpid(), signal.SIGINT)


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path,
                                                                caplog):
  holder = _start_holder(tmp_path)
  try:
    with pytest.raises(training_loops.RunLockedError,
                       match=f"PID {holder.pid} on"):
      run_loop("graph", checkpoint_dir=tmp_path)
  finally:
    _stop(holder)
  with caplog.at_level(logging.WARNING):
    history = run_loop("graph", checkpoint_dir=tmp_path)
  assert history.epochs == [0, 1]
  takeovers = [record.getMessage() for record in caplog.records
               if "Taking over" in record.getMessage()]
  assert len(takeovers) == 1
  assert f"the run of PID {holder.pid} on {socket.gethostname()}" in (
      takeovers[0])
  assert "ended without releasing it" in takeovers[0]


def test_a_lock_that_cannot_be_created_is_one_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(training_loops.WriteError,
                     match=f"^Could not write {blocker}/run: Not a "
                           r"directory\.$"):
    with training_loops.RunLock(blocker / "run"):
      pass


# -- failed writes ----------------------------------------------------------

def test_a_failed_checkpoint_write_ends_the_run_and_keeps_the_one_before(
    tmp_path):
  """A file-size limit (what a full disk looks like to a writer) set just
  before epoch 1's checkpoint makes TensorFlow's checkpoint writer fail
  mid-write; the JSON files written first are small enough to pass."""
  reference = run_loop("graph", epochs=3)
  _assert_file_too_large(tmp_path, checkpoint_dir=tmp_path,
                         callbacks=[_FileSizeLimitAtEpochEnd(1, 2500)])
  state = _read(tmp_path / "checkpoint").decode()
  assert 'model_checkpoint_path: "ckpt-1"' in state
  # The rerun resumes from the checkpoint before the failure and ends as
  # the uninterrupted run.
  resumed = run_loop("graph", epochs=3, checkpoint_dir=tmp_path)
  assert_same_run(resumed, reference, rtol=1e-6)


def test_a_failed_tensorboard_write_is_a_write_error(tmp_path):
  """TensorBoard's event files fail as every other write of a run does:
  one line naming the directory, not TensorFlow's error from inside its
  writer's flush."""
  _assert_file_too_large(tmp_path / "train", log_dir=tmp_path,
                         callbacks=[_FileSizeLimitAtEpochEnd(0, 300)])


def _assert_file_too_large(path, **run_kwargs):
  """A graph run of 3 epochs whose callbacks set a file-size limit (what a
  full disk looks like to a writer) ends in one line: `path` could not be
  written, the file too large."""
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  try:
    with pytest.raises(training_loops.WriteError) as failure:
      run_loop("graph", epochs=3, **run_kwargs)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    signal.signal(signal.SIGXFSZ, previous)
  message = str(failure.value)
  assert message.startswith(f"Could not write {path}: ")
  assert message.endswith("; File too large.")
  assert "\n" not in message


def test_a_tensorboard_directory_that_cannot_be_made_is_a_write_error(
    tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(training_loops.WriteError,
                     match=f"^Could not write {blocker}/logs/train: Not a "
                           r"directory\.$"):
    run_loop("graph", epochs=1, log_dir=blocker / "logs")

class _FileSizeLimitAtEpochEnd(keras.callbacks.Callback):

  def __init__(self, epoch, size):
    super().__init__()
    self.epoch, self.size = epoch, size

  def on_epoch_end(self, epoch, logs=None):
    if epoch == self.epoch:
      resource.setrlimit(resource.RLIMIT_FSIZE,
                         (self.size, resource.RLIM_INFINITY))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished classify run with an export, copied by each test that
  reruns into it."""
  directory = tmp_path_factory.mktemp("finished")
  _classify(directory / "run", export_dir=str(directory / "export"))
  return directory


def _copy(finished_run, tmp_path):
  shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
  return tmp_path / "run", tmp_path / "export"


def _disk_full(path, half=b"{\"half"):
  """What a writer meets when the disk fills: part of the file, then
  ENOSPC."""
  with open(path, "wb") as stream:
    stream.write(half)
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


_dump = json.dump


def _results_disk_full(content, stream, **kwargs):
  """`json.dump` that meets a full disk writing results.json only."""
  if not stream.name.endswith(".results.json"):  # the atomic temporary
    return _dump(content, stream, **kwargs)
  return _disk_full(stream.name)


def _rerun_failing(run_dir, **flag_values):
  """Reruns classify into `run_dir`; returns its one-line error and checks
  that nothing the first run wrote changed and no temporary is left."""
  before = {name: _read(run_dir / name) for name in _files(run_dir)
            if not name.startswith(("logs", "hparams", "checkpoints"))
            and name != "run.lock"}
  with pytest.raises(SystemExit) as failure:
    _classify(run_dir, **flag_values)
  for name, content in before.items():
    assert _read(run_dir / name) == content, name
  assert not [name for name in _files(run_dir) if ".tmp-" in name]
  return str(failure.value)


@pytest.mark.parametrize("writer,written", [
    ((training_loops.atomic.json, "dump", _results_disk_full),
     "results.json"),
    ((matplotlib.figure.Figure, "savefig",
      lambda figure, path, **_: _disk_full(path)),
     "learning_curves_graph.png")], ids=["results", "plot"])
def test_a_failed_write_keeps_the_previous_file(finished_run, tmp_path,
                                                monkeypatch, writer, written):
  run_dir, _ = _copy(finished_run, tmp_path)
  monkeypatch.setattr(*writer)
  assert _rerun_failing(run_dir) == (
      f"error: Could not write {run_dir}/{written}: No space left on "
      "device.")



def test_an_interruption_whose_partial_results_fail_keeps_its_exit_code(
    tmp_path, monkeypatch, capsys):
  """SIGINT after epoch 0, then a full disk for the partial results.json:
  the run still exits as interrupted (130), saying the results were not
  written; its checkpoint stands for the rerun."""
  recorded = training_loops.callbacks.EpochRecorder.on_epoch_end

  def interrupt_after_epoch_0(recorder, epoch, logs=None):
    recorded(recorder, epoch, logs)
    if epoch == 0:
      os.kill(os.getpid(), signal.SIGINT)
  monkeypatch.setattr(training_loops.callbacks.EpochRecorder, "on_epoch_end",
                      interrupt_after_epoch_0)
  monkeypatch.setattr(training_loops.atomic.json, "dump", _results_disk_full)
  with pytest.raises(SystemExit) as exit_:
    _classify(tmp_path, epochs=3)
  assert exit_.value.code == 128 + signal.SIGINT
  assert capsys.readouterr().err.strip() == (
      "Interrupted by SIGINT at epoch 1 (0-based), step 0: checkpoint saved; "
      "run again with the same checkpoint_dir to resume. The partial results "
      f"were not written: Could not write {tmp_path}/results.json: No space "
      "left on device. A rerun resumes.")
  assert not (tmp_path / "results.json").exists()
  # The checkpoint of epoch 0 stands for the rerun.
  assert tf.train.latest_checkpoint(tmp_path / "checkpoints" / "graph")

def test_a_failed_export_keeps_the_previous_export(finished_run, tmp_path,
                                                   monkeypatch):
  run_dir, export_dir = _copy(finished_run, tmp_path)
  exported = {name: _read(export_dir / name) for name in _files(export_dir)}

  def export(model, path, **_):
    os.makedirs(os.path.join(path, "variables"))
    _disk_full(os.path.join(path, "saved_model.pb"))

  monkeypatch.setattr(keras.Model, "export", export)
  assert _rerun_failing(run_dir, export_dir=str(export_dir)) == (
      f"error: Could not write {export_dir}/graph: No space left on device.")
  assert {name: _read(export_dir / name)
          for name in _files(export_dir)} == exported


def test_results_record_the_finished_run(finished_run):
  """The reference the failing reruns compare with is a real run's."""
  names = _files(finished_run / "run")
  assert {"results.json", "run_config.json", "learning_curves_graph.png",
          "confusion_matrix_graph.png"} <= set(names)
  assert np.isfinite(
      json.loads(_read(finished_run / "run" / "results.json"))
      ["loops"]["graph"]["test"]["loss"])
