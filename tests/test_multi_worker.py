"""Multi-worker training: two localhost workers equal one process; a dead
peer stops the survivor fast and a restart resumes."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

import multi_worker_job
from loop_models import wait_for_epochs


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for sock in sockets:
    sock.bind(("127.0.0.1", 0))
  ports = [sock.getsockname()[1] for sock in sockets]
  for sock in sockets:
    sock.close()
  return ports


def _start_workers(*arguments):
  """Two `multi_worker_job.py` processes on localhost ports."""
  workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
  tests_dir = os.path.dirname(__file__)
  processes = []
  for index in range(2):
    environment = dict(os.environ, TF_CONFIG=json.dumps({
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": index}}))
    processes.append(subprocess.Popen(
        [sys.executable, os.path.join(tests_dir, "multi_worker_job.py"),
         *map(str, arguments)], cwd=tests_dir, env=environment,
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


def _results_of(outcomes):
  for code, stdout, stderr in outcomes:
    assert code == 0, stderr[-3000:]
  return [json.loads(stdout.strip().splitlines()[-1])
          for _, stdout, _ in outcomes]


def test_two_workers_on_localhost_equal_one_process():
  outputs = _results_of(_finish(_start_workers("graph")))
  single = multi_worker_job.run("graph").history
  for output in outputs:
    assert output["replicas"] == 2
    for key, values in single.items():
      np.testing.assert_allclose(output["history"][key], values, rtol=1e-4,
                                 err_msg=key)


def test_a_dead_worker_stops_its_peer_fast_and_a_restart_resumes(tmp_path):
  epochs = 12
  processes = _start_workers("graph", epochs, tmp_path, 0.3)
  wait_for_epochs(tmp_path, 3, processes[0])
  processes[1].kill()  # SIGKILL: no goodbye to its peer
  killed_at = time.monotonic()
  code, _, stderr = _finish(processes[:1], timeout=120)[0]
  assert time.monotonic() - killed_at < 60
  assert code == 3, stderr[-3000:]
  assert "A peer worker stopped responding" in stderr
  _finish(processes[1:])
  # Restart both: they resume from the chief's last checkpoint.
  outputs = _results_of(_finish(_start_workers("graph", epochs, tmp_path)))
  single = multi_worker_job.run("graph", epochs=epochs).history
  for output in outputs:
    np.testing.assert_allclose(output["history"]["loss"], single["loss"],
                               rtol=1e-4)
