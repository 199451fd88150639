"""Kills a small experiment with SIGKILL at seeded random moments and checks
that each rerun ends exactly as one uninterrupted run.

    python -m research soak --configuration=graph --trials=50

Each trial runs the configuration's experiment in a child process that
kills itself at a moment drawn from the trial's seed: while a loop trains
(its restore, steps, step validations and callbacks), during a checkpoint
write, during an evaluation or during the write of `results.json` (at the
call's start, just before one of its file syncs or renames, or after a
random share of its duration in the uninterrupted run; at its end if it
ends first). It then reruns the same command to completion and compares
the run directory with the uninterrupted run's:

- every checkpointed tensor (weights, optimizer slots and step, loss scale,
  position, running metrics), bit for bit;
- `history.json` and `results.json`, less wall-clock timings;
- the steps each loop's rerun says it trained (`steps_trained`) and where it
  resumed (`resumed_from`) against the checkpoint left on disk by the kill:
  a rerun that silently started over would end identical too;
- no file the uninterrupted run has is missing, none is left that it does
  not have (a temporary of an interrupted write, a worker's scratch
  checkpoint), and every JSON file parses.

The `multi_worker` configuration runs two workers on localhost sharing
one output directory; each trial kills one of them (drawn), the other stops
when it finds its peer gone, and both rerun. It prints one line per trial
and a summary, and exits 1 unless every trial ended identical; `soak.json`
in --output_dir holds every trial. The experiment runs with op
determinism, so any difference is a resume that is not exact.
"""

import contextlib
import dataclasses
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from research.framework import run_config

@dataclasses.dataclass(frozen=True)
class Configuration:
  """What a soak kills: an experiment with its settings, run by `workers`
  processes (a multi-worker run on localhost, of which each trial kills
  one; every worker reruns)."""
  experiment: str
  settings: dict
  workers: int = 1


# Each an experiment on scikit-learn's digits, small enough for a trial in
# seconds, checkpointing mid-epoch.
_SMALL = {"dataset": "digits", "epochs": 3, "batch_size": 64,
          "limit_batches": 12, "checkpoint_every_steps": 5,
          "deterministic": True, "verbose": 0}
CONFIGURATIONS = {
    "graph": Configuration("classify", {**_SMALL, "loop": "graph"}),
    "eager": Configuration("classify", {**_SMALL, "loop": "eager"}),
    "mixed_float16": Configuration("classify", {
        **_SMALL, "loop": "graph", "precision": "mixed_float16"}),
    # A step of its own with two optimizers (discriminator, generator).
    "gan": Configuration("gan", {**_SMALL, "loop": "graph", "epochs": 2,
                                 "score_samples": 200}),
    # Two workers sharing one output directory, the chief writing it.
    "multi_worker": Configuration("classify", {
        **_SMALL, "loop": "graph", "strategy": "multi_worker"}, workers=2),
}

# A worker that outlives a run by this much is stopped: it hangs.
_TIMEOUT_SECONDS = 900

# Where a kill lands: the phase of the run the child was in.
# "training" is a loop's whole training call (its restore, steps and step
# validations, the callbacks' writes); the others are calls within it or
# after it, each labelled as the innermost.
KILL_POINTS = ("training", "checkpoint", "evaluation", "results")

# Entries of results.json and history.json that time or count one
# invocation's work, or name the run's directory.
_VOLATILE = ("steps_per_second", "wall_seconds", "resumed_from",
             "steps_trained", "output_dir")

_fsync = os.fsync  # the child's kill record syncs without being tracked


@dataclasses.dataclass(frozen=True)
class Config(run_config.Settings):
  configuration: str = run_config.setting(
      "graph", "What to kill: the loop and experiment.",
      choices=CONFIGURATIONS)
  trials: int = run_config.setting(50, "Killed and resumed runs.",
                                   at_least=1)
  kill_points: tuple[str, ...] = run_config.setting(
      KILL_POINTS, "Where the trials aim their kills, in turn.",
      choices=KILL_POINTS)
  seed: int = run_config.setting(0, "Seeds the kill moments.", at_least=0)

  def __post_init__(self):
    super().__post_init__()
    if not self.kill_points:
      raise run_config.SettingsError(
          f"--kill_points needs at least one of: {', '.join(KILL_POINTS)}.")
  output_dir: str = run_config.setting(
      os.path.join("runs", "soak"), "Where the runs go; each "
      "configuration in a directory of its own, replaced.")


@dataclasses.dataclass(frozen=True)
class Trial:
  """One killed and resumed run, compared with the uninterrupted one."""
  number: int
  aimed_at: str  # the kill point drawn
  worker: int  # the worker killed (0: the chief, or the only one)
  hit: str | None  # where the kill landed ("phase:sub-point"); None: missed
  differences: tuple  # what differs from the uninterrupted run
  resumed: bool  # the rerun completed

  @property
  def outcome(self):
    if not self.resumed:
      return "failed to resume"
    return "differing" if self.differences else "identical"


def main(config):
  """Runs the soak of `config.configuration`; returns its `Trial`s."""
  configuration = CONFIGURATIONS[config.configuration]
  root = os.path.join(config.output_dir, config.configuration)
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  if configuration.experiment == "gan":  # one judge for every run
    judge_dir = os.path.abspath(os.path.join(config.output_dir, "judge"))
    configuration = dataclasses.replace(configuration, settings={
        **configuration.settings, "judge_dir": judge_dir})
    if not glob.glob(os.path.join(judge_dir, "export", "*.keras")):
      # Trained by a run of its own: the reference's calls, from which the
      # kills are drawn, must be the trials' (which load the judge).
      _reference(configuration, os.path.join(root, "judge_training"))
  reference = os.path.join(root, "uninterrupted")
  _reference(configuration, reference)
  calls = [_read_json(os.path.join(reference, f"phases_{worker}.json"))
           for worker in range(configuration.workers)]
  draw = random.Random(config.seed)
  trials = []
  for number in range(config.trials):
    aimed_at = config.kill_points[number % len(config.kill_points)]
    worker = (draw.randrange(configuration.workers)
              if configuration.workers > 1 else 0)
    plan = {**_kill_plan(draw, aimed_at, calls[worker]), "worker": worker}
    trial = _trial(number, aimed_at, plan, configuration,
                   os.path.join(root, f"trial_{number:03d}"), reference)
    trials.append(trial)
    print(_trial_line(trial), flush=True)
  _write_json(os.path.join(root, "soak.json"), {
      "configuration": config.configuration,
      **dataclasses.asdict(configuration), "seed": config.seed,
      "kill_points": config.kill_points,
      "trials": [dataclasses.asdict(trial) for trial in trials]})
  print(summary(config.configuration, trials))
  if any(trial.outcome != "identical" for trial in trials):
    sys.exit(f"error: not every trial ended as the uninterrupted run; see "
             f"{os.path.join(root, 'soak.json')}.")
  return trials


def _reference(configuration, directory):
  """An uninterrupted run of `configuration` into `directory`."""
  if _run(configuration, directory, plan=None) != [0] * configuration.workers:
    sys.exit(f"error: the uninterrupted run failed; see {directory}.*.log")


def _kill_plan(draw, aimed_at, calls):
  """Where the child kills itself: the `call`-th entry (1-based) into
  `aimed_at` in the uninterrupted run, at its start (sub-point 0), at one
  of its file syncs or renames, or after `delay` seconds."""
  if not calls[aimed_at]:
    sys.exit(f"error: the uninterrupted run never entered {aimed_at!r}: "
             f"nothing to kill there; choose other --kill_points.")
  chosen = draw.randrange(len(calls[aimed_at]))
  seconds, sub_points = calls[aimed_at][chosen]
  at = draw.randrange(sub_points + 2)  # entry, each sub-point, a delay
  return {"phase": aimed_at, "call": chosen + 1,
          "sub_point": at if at <= sub_points else None,
          "delay": draw.uniform(0, seconds)}


def _trial(number, aimed_at, plan, configuration, directory, reference):
  codes = _run(configuration, directory, plan)
  hit = None
  if codes[plan["worker"]] == -signal.SIGKILL:
    hit = _read_json(os.path.join(directory, "killed.json"))["at"]
  on_disk = _positions(directory)  # what the rerun must resume from
  if _run(configuration, directory, plan=None) != [0] * configuration.workers:
    return Trial(number, aimed_at, plan["worker"], hit, (), resumed=False)
  return Trial(number, aimed_at, plan["worker"], hit,
               tuple(differences(directory, reference, on_disk)),
               resumed=True)


def _trial_line(trial):
  where = trial.hit or "not killed (the run ended first)"
  if trial.worker:
    where = f"worker {trial.worker} {where}"
  details = f": {'; '.join(trial.differences)}" if trial.differences else ""
  return (f"trial {trial.number:3d}  aimed at {trial.aimed_at:10}  killed "
          f"at {where:32}  {trial.outcome}{details}")


def summary(configuration, trials):
  """The soak's figures in one line: trials, kill points hit, outcomes."""
  hits = {}
  for trial in trials:
    point = trial.hit.split(":")[0] if trial.hit else "missed"
    hits[point] = hits.get(point, 0) + 1
  outcomes = {outcome: sum(trial.outcome == outcome for trial in trials)
              for outcome in ("identical", "differing", "failed to resume")}
  killed = ", ".join(f"{point} {count}"
                     for point, count in sorted(hits.items()))
  ended = ", ".join(f"{outcome} {count}"
                    for outcome, count in outcomes.items())
  return f"{configuration}: {len(trials)} trials; killed in {killed}; {ended}"


# -- comparing a trial with the uninterrupted run ---------------------------

def differences(directory, reference, on_disk):
  """What differs between the run in `directory` and the uninterrupted one
  in `reference`, in one line each; `on_disk` is `_positions(directory)`
  taken before the rerun."""
  found = _file_differences(directory, reference)
  for loop in sorted(_positions(reference)):
    found += _checkpoint_differences(directory, reference, loop)
  results, expected = (_read_json(os.path.join(path, "run", "results.json"))
                       for path in (directory, reference))
  if _without_timings(results) != _without_timings(expected):
    found.append("results.json differs")
  for loop, entry in results["loops"].items():
    found += _accounting(loop, entry, on_disk.get(loop),
                         expected["loops"][loop]["steps_trained"])
  return found


def _file_differences(directory, reference):
  """Files of the uninterrupted run the trial lacks, files it has that the
  uninterrupted run does not (a temporary of an interrupted write, a
  worker's scratch checkpoint), and JSON files that do not parse."""
  found = []
  ours, theirs = _files(directory), _files(reference)
  for kind, paths in (("missing", theirs - ours),
                      ("left over", ours - theirs)):
    if paths:
      found.append(f"{kind}: {', '.join(sorted(paths))}")
  for path in _files(directory):
    if path.endswith(".json"):
      try:
        _read_json(os.path.join(directory, path))
      except ValueError:
        found.append(f"{path} does not parse")
  return found


def _files(directory):
  """The run's files by path under `directory`, less those named by their
  process or save (TensorBoard events, checkpoint shards)."""
  paths = set()
  for parent, _, names in os.walk(os.path.join(directory, "run")):
    for name in names:
      if not name.startswith(("events.out.tfevents", "ckpt-")):
        paths.add(os.path.relpath(os.path.join(parent, name), directory))
  return paths


def _checkpoint_differences(directory, reference, loop):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tensors = []
  for path in (directory, reference):
    reader = tf.train.load_checkpoint(_checkpoint_dir(path, loop))
    tensors.append({name: reader.get_tensor(name) for name in
                    reader.get_variable_to_shape_map()
                    if not name.startswith(("save_counter",
                                            "_CHECKPOINTABLE_OBJECT_GRAPH"))})
  ours, theirs = tensors
  if ours.keys() != theirs.keys():
    return [f"{loop}: the checkpoint holds other variables"]
  differing = [name for name in sorted(ours)  # bit for bit, NaN included
               if _bits(ours[name]) != _bits(theirs[name])]
  found = [f"{loop}: {len(differing)} checkpointed tensors differ, e.g. "
           f"{differing[0]}"] if differing else []
  histories = [_without_timings(_read_json(os.path.join(
      _checkpoint_dir(path, loop), "history.json")))
      for path in (directory, reference)]
  if histories[0] != histories[1]:
    found.append(f"{loop}: history.json differs")
  return found


def _accounting(loop, entry, position, total_steps):
  """`entry` (the rerun's results for `loop`) says it resumed from the
  checkpoint the kill left and trained exactly the steps after it."""
  expected_from = None if position is None else {
      "epoch": position["epochs_done"], "step": position["steps_in_epoch"]}
  steps_before = 0 if position is None else position["steps_done"]
  found = []
  if entry["resumed_from"] != expected_from:
    found.append(f"{loop}: resumed from {entry['resumed_from']}, the "
                 f"checkpoint on disk was {expected_from}")
  if entry["steps_trained"] != total_steps - steps_before:
    found.append(f"{loop}: trained {entry['steps_trained']} steps, "
                 f"{total_steps - steps_before} were left")
  return found


def _bits(value):
  return value if isinstance(value, bytes) else value.tobytes()


def _positions(directory):
  """`{loop: {"epochs_done", "steps_in_epoch", "steps_done"}}` of each
  loop's latest checkpoint in the run under `directory`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  positions = {}
  checkpoints = os.path.join(directory, "run", "checkpoints")
  for loop in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else ()):
    latest = tf.train.latest_checkpoint(os.path.join(checkpoints, loop))
    if latest:
      reader = tf.train.load_checkpoint(latest)
      positions[loop] = {
          key: int(reader.get_tensor(f"{key}/.ATTRIBUTES/VARIABLE_VALUE"))
          for key in ("epochs_done", "steps_in_epoch", "steps_done")}
  return positions


def _checkpoint_dir(directory, loop):
  return os.path.join(directory, "run", "checkpoints", loop)


def _without_timings(content):
  """`content` (results or a history) less the wall-clock figures and what
  counts one invocation's work."""
  if isinstance(content, dict):
    return {key: _without_timings(value) for key, value in content.items()
            if key not in _VOLATILE and "seconds" not in key}
  if isinstance(content, list):
    return [_without_timings(value) for value in content]
  return content


# -- the child process ------------------------------------------------------

def _run(configuration, directory, plan):
  """Runs `configuration` into `directory/run`: each worker a child
  process (`child`), the one `plan` names killing itself as it says (None:
  no kill, and each records its phases' calls to
  `directory/phases_<worker>.json`). Returns the workers' exit codes
  (None: stopped after `_TIMEOUT_SECONDS`)."""
  os.makedirs(directory, exist_ok=True)
  addresses = [f"127.0.0.1:{port}"
               for port in free_ports(configuration.workers)]
  processes = []
  for worker in range(configuration.workers):
    instructions = os.path.join(directory, f"child_{worker}.json")
    _write_json(instructions, {
        "experiment": configuration.experiment,
        "settings": configuration.settings, "directory": directory,
        "worker": worker,
        "plan": plan if plan and plan["worker"] == worker else None,
        "record_phases": plan is None})
    environment = dict(os.environ)
    if configuration.workers > 1:
      environment["TF_CONFIG"] = json.dumps({
          "cluster": {"worker": addresses},
          "task": {"type": "worker", "index": worker}})
    with open(f"{directory}.worker{worker}.log", "a",
              encoding="utf-8") as log:
      processes.append(subprocess.Popen(
          [sys.executable, "-c", "from research.tools import soak; "
           f"soak.child({instructions!r})"], stdout=log, stderr=log,
          env=environment))
  deadline = time.monotonic() + _TIMEOUT_SECONDS
  codes = []
  for process in processes:
    try:
      codes.append(process.wait(max(0.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
      codes.append(None)
  return codes


def free_ports(count):
  """`count` TCP ports free on localhost now, for a cluster's workers."""
  sockets = [socket.socket() for _ in range(count)]
  for sock in sockets:
    sock.bind(("127.0.0.1", 0))
  ports = [sock.getsockname()[1] for sock in sockets]
  for sock in sockets:
    sock.close()
  return ports


def child(instructions_path):
  """The child process: runs the experiment under the phase tracker."""
  import research  # pylint: disable=g-import-not-at-top
  instructions = _read_json(instructions_path)
  directory, plan = instructions["directory"], instructions["plan"]
  worker = instructions["worker"]
  tracker = _PhaseTracker(plan, os.path.join(directory, "killed.json"))
  tracker.instrument()
  module = __import__(f"research.experiments.{instructions['experiment']}",
                      fromlist=["main"])
  del research
  config = module.Config.resolved(
      **instructions["settings"], output_dir=os.path.join(directory, "run"))
  module.main(config)
  if instructions["record_phases"]:
    _write_json(os.path.join(directory, f"phases_{worker}.json"),
                tracker.calls)


class _PhaseTracker:
  """Follows which phase of the run the process is in, by wrapping the
  functions that start each; and kills the process where `plan` says.

  `calls[phase]` lists each call's `[seconds, sub-points]`: its duration and
  the file syncs and renames it made, from which a plan is drawn."""

  def __init__(self, plan, record_path):
    self.plan, self.record_path = plan, record_path
    self.phases = ["outside training"]
    self.calls = {point: [] for point in KILL_POINTS}
    self.entries = {point: 0 for point in KILL_POINTS}
    self.sub_points = None  # of the current tracked call
    self.armed = False  # in the call the plan aims at
    self._killing = threading.Lock()

  def instrument(self):
    # pylint: disable=g-import-not-at-top
    import training_loops
    from training_loops import checkpoints, controller, drivers, keras_fit
    self._wrap(controller.Controller, "run", "training")
    self._wrap(checkpoints.RunCheckpoint, "save", "checkpoint")
    for driver in (drivers.StepDriver, keras_fit.KerasFitDriver):
      self._wrap(driver, "evaluate", "evaluation")
    self._wrap(training_loops, "write_json_atomically",
               lambda path, *_, **__: "results"
               if os.path.basename(path) == "results.json" else None)
    for name in ("replace", "fsync"):
      self._wrap_sub_point(os, name)

  def _wrap(self, owner, name, phase):
    """Tracks calls of `owner.name` as `phase`, or as what `phase` returns
    for their arguments (None: untracked)."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
      called = phase(*args, **kwargs) if callable(phase) else phase
      if called is None:
        return original(*args, **kwargs)
      with self._in(called):
        return original(*args, **kwargs)
    setattr(owner, name, wrapped)

  def _wrap_sub_point(self, owner, name):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
      if self.sub_points is not None:
        self.sub_points += 1
        if self.armed and self.plan["sub_point"] == self.sub_points:
          self._kill(f"{name}#{self.sub_points}")
      return original(*args, **kwargs)
    setattr(owner, name, wrapped)

  @contextlib.contextmanager
  def _in(self, phase):
    self.entries[phase] += 1
    outer = (self.sub_points, self.armed)
    self.phases.append(phase)
    self.sub_points = 0
    self.armed = bool(self.plan and self.plan["phase"] == phase
                      and self.plan["call"] == self.entries[phase])
    if self.armed:
      if self.plan["sub_point"] == 0:
        self._kill("start")
      if self.plan["sub_point"] is None:
        threading.Thread(target=self._kill_after, daemon=True,
                         args=(self.plan["delay"],)).start()
    start = time.perf_counter()
    try:
      yield
    finally:
      if self.armed:  # its sub-point or delay was not reached: now, then
        self._kill("end")
      self.calls[phase].append([time.perf_counter() - start,
                                self.sub_points])
      self.phases.pop()
      self.sub_points, self.armed = outer

  def _kill_after(self, seconds):
    time.sleep(seconds)
    self._kill(f"{seconds:.3f}s")

  def _kill(self, sub_point):
    """Records where the kill lands, then SIGKILLs this process. The first
    caller (the main thread, or the timer's) holds the lock till the end."""
    self._killing.acquire()
    at = f"{self.phases[-1]}:{sub_point}"
    with open(self.record_path, "w", encoding="utf-8") as stream:
      json.dump({"at": at}, stream)
      stream.flush()
      _fsync(stream.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def _read_json(path):
  with open(path, encoding="utf-8") as stream:
    return json.load(stream)


def _write_json(path, content):
  with open(path, "w", encoding="utf-8") as stream:
    json.dump(content, stream, indent=2)


if __name__ == "__main__":
  run_config.run_cli(Config, main)
