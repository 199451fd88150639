"""Multi-worker training: two localhost workers equal one process; a peer
dead in training or in a restore stops the survivor fast and a restart
resumes; a research script's
workers share one output directory, where the chief alone writes, or have
one each."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from loop_models import wait_for_epochs
import multi_worker_job
import training_loops
from research.experiments import classify
from research.tools import soak


def _start_workers(*arguments):
  """Two `multi_worker_job.py` processes on localhost ports."""
  tests_dir = os.path.dirname(__file__)
  return _start_cluster(
      lambda index: [os.path.join(tests_dir, "multi_worker_job.py"),
                     *map(str, arguments)], cwd=tests_dir)


def _start_cluster(arguments_of, cwd):
  """Two workers on localhost ports, worker `index` running
  `python *arguments_of(index)`."""
  workers = [f"127.0.0.1:{port}" for port in soak.free_ports(2)]
  processes = []
  for index in range(2):
    environment = dict(os.environ, TF_CONFIG=json.dumps({
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": index}}))
    processes.append(subprocess.Popen(
        [sys.executable, *arguments_of(index)], cwd=cwd, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return processes


def _finish(processes, timeout=240):
  """Waits for every process (killing all on timeout); returns (code,
  stdout, stderr) of each."""
  try:
    outcomes = []
    for process in processes:
      stdout, stderr = process.communicate(timeout=timeout)
      outcomes.append((process.returncode, stdout, stderr))
    return outcomes
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()


def _results_of(outcomes, run=0):
  """Each worker's results of its `run`-th run."""
  for code, stdout, stderr in outcomes:
    assert code == 0, stderr[-3000:]
  return [json.loads(stdout.strip().splitlines()[-1])[run]
          for _, stdout, _ in outcomes]


def test_two_workers_on_localhost_equal_one_process(mirrored):
  """Each worker trains on its half of every batch (two workers each
  training alone on all the data would print the one-process history
  too), and their gradients are summed: the weights of one process with
  two replicas (a strategy's run: fit's data order under one, which the
  loops follow)."""
  outputs = _results_of(_finish(_start_workers("graph")))
  single = multi_worker_job.run("graph", mirrored)
  replicas = multi_worker_job.RECORDERS[-1].seen(mirrored)
  examples = sum(seen for seen, _ in replicas)
  total = sum(summed for _, summed in replicas)
  assert examples == 100  # 2 epochs of 50
  (first,), (second,) = (output["seen"] for output in outputs)
  assert first[0] == second[0] == examples / 2
  assert first[1] != second[1]
  np.testing.assert_allclose(first[1] + second[1], total, rtol=1e-5)
  for output in outputs:
    assert output["replicas"] == 2
    for key, values in single.history.items():
      np.testing.assert_allclose(output["history"][key], values, rtol=1e-4,
                                 err_msg=key)
    for got, expected in zip(output["weights"], single.model.get_weights()):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


_GAN_LOOPS = ("eager", "function", "graph")


@pytest.fixture(scope="module")
def gan_workers():
  """Two workers training the GAN in each of `_GAN_LOOPS` in turn."""
  return _finish(_start_workers(f"gan:{','.join(_GAN_LOOPS)}"))


@pytest.mark.parametrize("loop", _GAN_LOOPS)
def test_a_gans_own_step_on_two_workers_equals_two_replicas_in_one_process(
    loop, mirrored, gan_workers):
  """Each worker one replica, each replica half of every batch and its own
  mean loss, as two mirrored replicas in one process (which
  `test_custom_steps` holds to fit under the same strategy): the same logs
  and, in both networks, the same weights."""
  outputs = _results_of(gan_workers, _GAN_LOOPS.index(loop))
  single = multi_worker_job.run_gan(loop, mirrored)
  for output in outputs:
    assert output["replicas"] == 2
    assert sorted(output["history"]) == sorted(single.history)
    for key, values in single.history.items():
      np.testing.assert_allclose(output["history"][key], values, rtol=1e-4,
                                 err_msg=key)
    weights = single.model.get_weights()
    assert len(output["weights"]) == len(weights) == 4 * 2
    for got, expected in zip(output["weights"], weights):
      np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def _lost_peer(survivor, killed_at):
  """The line `survivor` stopped with, within a minute of its peer's
  death, having said so."""
  code, _, stderr = _finish([survivor], timeout=120)[0]
  assert time.monotonic() - killed_at < 60
  assert code == 3, stderr[-3000:]
  (line,) = [line for line in stderr.splitlines()
             if line.startswith("A peer worker stopped responding")]
  return line


def _checkpoint_files(directory):
  """What the chief's checkpoint directory holds (less a worker's scratch
  directory, which a killed worker may leave until its next save), and the
  contents of its state file and history."""
  names = sorted(name for name in os.listdir(directory)
                 if not name.startswith(".worker_"))
  return names, [(directory / name).read_bytes()
                 for name in ("checkpoint", "history.json")]


def test_a_worker_lost_in_training_or_in_a_restore_stops_its_peer_fast(
    tmp_path, mirrored):
  """A worker SIGKILLed in training, then one SIGKILLed as the restart's
  restore begins: each time its peer stops within a minute with the lost
  peer's line (not waiting forever in a collective), leaving the
  checkpoints as they were; a restart of both then resumes from the last
  one and trains only what is left."""
  epochs = 12
  processes = _start_workers("graph", epochs, tmp_path, 0.3)
  wait_for_epochs(tmp_path, 3, processes[0])
  processes[1].kill()  # SIGKILL: no goodbye to its peer
  line = _lost_peer(processes[0], time.monotonic())
  assert re.search(r"in epoch \d+ \(0-based\)", line), line
  _finish(processes[1:])
  before = _checkpoint_files(tmp_path)
  checkpoint = tf.train.load_checkpoint(tf.train.latest_checkpoint(
      str(tmp_path)))
  saved_at = {"epoch": int(checkpoint.get_tensor(
      "epochs_done/.ATTRIBUTES/VARIABLE_VALUE")), "step": int(
          checkpoint.get_tensor("steps_in_epoch/.ATTRIBUTES/VARIABLE_VALUE"))}
  assert saved_at["epoch"] >= 3 and saved_at["step"] == 0, saved_at

  # Worker 1 dies as the restart's restore begins; the chief is in it.
  processes = _start_workers("graph", epochs, tmp_path, 0, 1)
  killed = processes[1].wait(timeout=120)
  assert killed == -signal.SIGKILL
  line = _lost_peer(processes[0], time.monotonic())
  assert "epoch" not in line, line  # before training
  assert _checkpoint_files(tmp_path) == before  # nothing moved or written

  # Restart both: they resume from the chief's last checkpoint.
  outputs = _results_of(_finish(_start_workers("graph", epochs, tmp_path)))
  single = multi_worker_job.run("graph", mirrored, epochs=epochs)
  per_epoch = single.steps_trained // epochs
  for output in outputs:
    np.testing.assert_allclose(output["history"]["loss"],
                               single.history["loss"], rtol=1e-4)
    assert output["resumed_from"] == saved_at
    assert output["steps_trained"] == (epochs - saved_at["epoch"]) * per_epoch
  assert not (tmp_path / ".worker_1").exists()  # removed at its save


# -- a research script's workers and their output directories -------------

_CLASSIFY = ["-m", "research", "classify", "--strategy=multi_worker",
             "--loop=graph", "--epochs=2", "--verbose=0"]


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
  """Two clusters at once, each of two workers running classify: one with
  a single output directory for both workers, one with a directory each.
  Returns {"shared": dir, "own": [dir of worker 0, dir of worker 1]}."""
  shared = tmp_path_factory.mktemp("shared")
  own = [tmp_path_factory.mktemp(f"own_{index}") for index in range(2)]
  clusters = [
      _start_cluster(lambda index: [*_CLASSIFY, f"--output_dir={shared}"],
                     cwd=REPO),
      _start_cluster(lambda index: [*_CLASSIFY, f"--output_dir={own[index]}"],
                     cwd=REPO)]
  outcomes = _finish([process for cluster in clusters for process in cluster],
                     timeout=300)
  for code, _, stderr in outcomes:
    assert code == 0, stderr[-3000:]
  return {"shared": shared, "own": own}


def _files(directory):
  """Every file under `directory`; TensorBoard's event files named
  without their time, host and PID."""
  return sorted(
      re.sub(r"events\.out\.tfevents\..*", "events",
             os.path.relpath(os.path.join(root, name), directory))
      for root, _, names in os.walk(directory) for name in names)


def _loss_of(directory):
  with open(os.path.join(directory, "results.json"), encoding="utf-8") as f:
    return json.load(f)["loops"]["graph"]["history"]["loss"]


def test_workers_sharing_an_output_dir_write_it_once(script_runs):
  files = _files(script_runs["shared"])
  # The chief's run, whole: what a one-process run writes.
  assert {"run.lock", "run_config.json", "results.json",
          "learning_curves_graph.png", "confusion_matrix_graph.png",
          "checkpoints/graph/checkpoint", "checkpoints/graph/run.lock",
          "checkpoints/graph/history.json"} <= set(files)
  assert "logs/graph/train/events" in files
  # Worker 1's: no scratch checkpoint left, nothing else.
  assert not [name for name in files if ".worker_" in name]
  assert files == _files(script_runs["own"][0])


def test_a_worker_with_its_own_output_dir_leaves_it_empty(script_runs):
  assert _files(script_runs["own"][1]) == []


def test_workers_in_either_layout_train_the_one_process_run(script_runs,
                                                            tmp_path,
                                                            mirrored):
  """One process with two replicas (the session's `mirrored`)."""
  del mirrored  # the CPU split in two, as --cpu_replicas=2 asks
  shared, own = _loss_of(script_runs["shared"]), _loss_of(
      script_runs["own"][0])
  np.testing.assert_allclose(shared, own, rtol=1e-6)
  classify.main(
      classify.Config.resolved(
          loop="graph", epochs=2, verbose=0, strategy="mirrored",
          cpu_replicas=2, output_dir=str(tmp_path)))
  np.testing.assert_allclose(shared, _loss_of(tmp_path), rtol=1e-4)


def test_workers_that_cannot_read_the_chiefs_checkpoints_refuse_to_resume(
    script_runs):
  # A restart with a directory each: worker 1 finds no checkpoint in its
  # own, while the chief resumes after epoch 2.
  own = script_runs["own"]
  outcomes = _finish(_start_cluster(
      lambda index: [*_CLASSIFY, "--epochs=3", f"--output_dir={own[index]}"],
      cwd=REPO))
  for index, (code, _, stderr) in enumerate(outcomes):
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "error: The workers would resume from different checkpoints (this "
        f"one {'ckpt-2' if index == 0 else 'none'} in {own[index]}/"
        f"checkpoints/graph; another {'none' if index == 0 else 'ckpt-2'}): "
        "every worker must read the chief's checkpoints, so give them one "
        "checkpoint directory on a file system they share.")
  assert not [name for name in _files(own[0]) if "damaged" in name]
  assert _files(own[1]) == []


def test_what_only_the_chief_refuses_every_worker_says(tmp_path):
  """The chief alone takes the output directory's lock: held by another
  run, it refuses, and the other worker stops with the chief's line (not
  "A peer worker stopped responding"), neither training nor writing."""
  with training_loops.RunLock(tmp_path) as _:
    outcomes = _finish(_start_cluster(
        lambda index: [*_CLASSIFY, f"--output_dir={tmp_path}"], cwd=REPO))
  lines = []
  for code, _, stderr in outcomes:
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    lines.append(stderr.strip().splitlines()[-1])
  assert lines[0].startswith(f"error: {tmp_path} is in use by "), lines[0]
  assert lines[1] == "error: the chief refused the run: " + lines[0][
      len("error: "):]
  assert sorted(os.listdir(tmp_path)) == ["run.lock"]
