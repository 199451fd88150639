"""`RunLock`: one run at a time in a run directory."""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

from training_loops.atomic import WriteError, make_directory


class RunLockedError(RuntimeError):
  """Another live run holds the directory."""


class RunLock:
  """An exclusive lock on `directory` for one run, taken atomically when
  entered and released when left: `directory/run.lock` holds the host, PID
  and start time of the run holding it.

      with RunLock(output_dir):
        ...  # train, write results

  The lock itself is a `fcntl.flock` on that file, which the kernel drops
  when its process ends however it ends, so a lock left by a dead run
  (`kill -9`, a crash, a reboot) never blocks: the file still names the
  dead holder, and the next run takes it over with a warning. A clean
  exit empties the file. On a network file system flock works across
  machines where the file system forwards locks (NFS does, as a
  per-process POSIX lock: so a process asking again for a directory it
  holds is refused here, before the file system is asked).

  Raises (on entering):
    RunLockedError: a live run holds the directory; names it.
    WriteError: the lock file cannot be created.
  """

  _held = set()  # real paths this process holds

  FILENAME = "run.lock"

  def __init__(self, directory):
    self.directory = os.fspath(directory)
    self.path = os.path.join(self.directory, self.FILENAME)
    self._descriptor = None

  def __enter__(self):
    make_directory(self.directory)
    key = os.path.realpath(self.path)
    if key in RunLock._held:
      raise RunLockedError(
          f"{self.directory} is in use by this process already (PID "
          f"{os.getpid()}): give each run its own directory.")
    try:
      descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
      raise WriteError(self.path, error) from None
    try:
      if self._locked(descriptor):
        _write(descriptor, json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds")}))
    except OSError as error:
      os.close(descriptor)
      raise WriteError(self.path, error) from None
    except BaseException:
      os.close(descriptor)
      raise
    self._descriptor, self._key = descriptor, key
    RunLock._held.add(key)
    return self

  def _locked(self, descriptor):
    """Takes the flock; False on a file system without locks, where the
    run goes ahead unguarded rather than not at all."""
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      if error.errno not in (errno.EAGAIN, errno.EACCES):
        logging.warning("Cannot lock %s (%s); nothing stops a second run "
                        "from writing into it.", self.path, error.strerror)
        return False
      raise RunLockedError(
          f"{self.directory} is in use by {_describe(_read(descriptor))}: "
          "wait for it to end, stop it, or use another directory."
      ) from None
    previous = _read(descriptor)
    if previous:
      logging.warning("Taking over %s from %s, which ended without "
                      "releasing it.", self.path, _describe(previous))
    return True

  def __exit__(self, *exc_info):
    if self._descriptor is None:
      return
    RunLock._held.discard(self._key)
    try:
      _write(self._descriptor, "")  # released cleanly: no holder to name
    except OSError:
      pass  # the kernel's lock goes with the descriptor all the same
    finally:
      os.close(self._descriptor)  # drops the flock
      self._descriptor = None


def held_by_chief(directory, strategy):
  """The run's `RunLock` on `directory`, taken by the chief alone: the
  workers of one multi-worker run are one run (the others write to scratch
  copies). A null context for the other workers."""
  if not strategy.extended.should_checkpoint:
    return contextlib.nullcontext()
  return RunLock(directory)


def _read(descriptor):
  os.lseek(descriptor, 0, os.SEEK_SET)
  text = os.read(descriptor, 4096).decode("utf-8", "replace").strip()
  if not text:
    return None
  try:
    return json.loads(text)
  except ValueError:
    return {"unreadable": text[:80]}


def _write(descriptor, text):
  os.ftruncate(descriptor, 0)
  os.pwrite(descriptor, text.encode("utf-8"), 0)
  os.fsync(descriptor)


def _describe(holder):
  if not holder:
    return "a run that is starting"
  if "pid" not in holder:
    return f"a run ({holder})"
  return (f"the run of PID {holder['pid']} on {holder.get('host', '?')}, "
          f"started {holder.get('started', '?')}")
