"""Writes that a crash cannot leave half done."""

import contextlib
import json
import os
import re
import shutil
import uuid

import tensorflow as tf


class WriteError(RuntimeError):
  """A file or directory of the run could not be written (disk full,
  permission denied, ...); what was there before is intact.

  Attributes:
    path: what was being written.
    cause: the underlying `OSError` or TensorFlow error.
  """

  def __init__(self, path, cause):
    reason = (getattr(cause, "strerror", None) or
              getattr(cause, "message", None) or str(cause))
    # TensorFlow's messages open with the failing function's name and
    # close with the op's: the file and errno are between.
    reason = re.sub(r"^\{\{.*?\}\}\s*|\s*\[Op:\w+\]$", "",
                    reason.strip().splitlines()[0])
    super().__init__(f"Could not write {os.fspath(path)}: {reason}.")
    self.path, self.cause = os.fspath(path), cause


# What a failed write raises: Python's file API, and TensorFlow's (its
# checkpoint and SavedModel writers map errno onto these: ENOSPC is
# ResourceExhausted, EFBIG OutOfRange, EACCES and EROFS PermissionDenied).
# Not TensorFlow's catch-alls (Unknown, Internal, FailedPrecondition): those
# are as likely a failed trace or a collective as a file.
WRITE_FAILURES = (OSError, tf.errors.PermissionDeniedError,
                  tf.errors.ResourceExhaustedError,
                  tf.errors.OutOfRangeError)


@contextlib.contextmanager
def replaced_atomically(path):
  """Yields a temporary path to write a file or a directory to; when the
  block ends, renames what was written there over `path`.

      with replaced_atomically("best.weights.h5") as temporary:
        model.save_weights(temporary)

  The temporary is `.tmp-<random>.<name>` beside `path` (whose directory is
  created if missing): on the same file system, so the rename is atomic,
  and with the same name ending, from which Keras (`.keras`, `.weights.h5`)
  and matplotlib (`.png`) take the format. What was written is synced to
  disk before the rename, so readers see the previous version or the new
  one, never a torn file, even after a power cut.

  No rename replaces a non-empty directory, so a directory takes two: the
  previous one moves aside to `.old.<name>`, the new one moves in, then the
  old one is deleted. One left aside by a crash between the two renames is
  put back by the next call if `path` is missing, else deleted. A `path`
  has one writer at a time, so the next call also deletes the temporary a
  writer killed mid-write left behind.

  If the block raises, the temporary is removed, `path` is left as it was
  and the exception propagates, as a `WriteError` naming `path` when it is
  one of `WRITE_FAILURES` (a full disk, a denied permission). A process
  killed mid-write leaves its temporary behind, until the next write of
  `path`.
  """
  directory, name = os.path.split(os.fspath(path))
  directory = directory or os.curdir
  path = os.path.join(directory, name)
  make_directory(directory)
  aside = os.path.join(directory, f".old.{name}")
  _recover(aside, path)
  _remove_dead_temporaries(directory, name)
  temporary = os.path.join(directory, f".tmp-{uuid.uuid4().hex[:12]}.{name}")
  try:
    yield temporary
    _sync_tree(temporary)
    if os.path.isdir(temporary) or os.path.isdir(path):
      if os.path.lexists(path):
        os.replace(path, aside)
      os.replace(temporary, path)
      _remove(aside)
    else:
      os.replace(temporary, path)
    _fsync(directory)  # the rename itself
  except BaseException as error:
    _remove(temporary)
    _recover(aside, path)
    if isinstance(error, WRITE_FAILURES):
      raise WriteError(path, error) from error
    raise


@contextlib.contextmanager
def writing(path):
  """Runs a block that writes `path` with no temporary to swap in (a
  directory, an append-only TensorBoard event file, TensorFlow's own
  checkpoint writer): one of `WRITE_FAILURES` it raises becomes a
  `WriteError` naming `path`."""
  try:
    yield
  except WRITE_FAILURES as error:
    raise WriteError(path, error) from error


def make_directory(path):
  """`os.makedirs(path, exist_ok=True)`, failing as a `WriteError`."""
  with writing(path):
    os.makedirs(path, exist_ok=True)


def write_json_atomically(path, content, indent=None):
  """Writes `content` as JSON over `path` by `replaced_atomically`: readers
  see the old file or the new one, never a torn one."""
  with replaced_atomically(path) as temporary:
    with open(temporary, "w", encoding="utf-8") as stream:
      json.dump(content, stream, indent=indent, sort_keys=indent is not None)


def _recover(aside, path):
  """Puts back the previous version a directory replacement had moved
  aside when it stopped before the new one was in place; deletes it when
  the new one is."""
  if not os.path.lexists(aside):
    return
  if os.path.lexists(path):
    _remove(aside)
  else:
    os.replace(aside, path)


def _remove_dead_temporaries(directory, name):
  """Deletes the temporaries of `name` in `directory`: a writer killed
  mid-write left them (`path` has one writer at a time)."""
  for entry in os.listdir(directory):
    if _TEMPORARY.fullmatch(entry) and entry[len(".tmp-") + 13:] == name:
      _remove(os.path.join(directory, entry))


_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{12}\..+", re.DOTALL)


def _sync_tree(path):
  if os.path.isdir(path):
    for root, _, files in os.walk(path):
      for file in files:
        _fsync(os.path.join(root, file))
      _fsync(root)
  else:
    _fsync(path)


def _fsync(path):
  descriptor = os.open(path, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def _remove(path):
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)
