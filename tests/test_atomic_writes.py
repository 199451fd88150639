"""Interrupted writes lose nothing: `replaced_atomically` and its users."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

import training_loops
from conftest import REPO
from loop_models import classifier
from research.framework import experiment


class _Unserializable:
  pass


def test_interrupted_json_write_leaves_the_previous_file(tmp_path):
  path = tmp_path / "results.json"
  training_loops.write_json_atomically(path, {"epoch": 1})
  with pytest.raises(TypeError):  # json.dump fails halfway through
    training_loops.write_json_atomically(
        path, {"epoch": 2, "model": _Unserializable()})
  assert json.loads(path.read_text()) == {"epoch": 1}
  assert os.listdir(tmp_path) == ["results.json"]


def test_interrupted_export_leaves_the_previous_export(tmp_path):
  model = classifier(batch_norm=False)
  target = str(tmp_path / "export")
  experiment.export(model, target)
  before = sorted(os.listdir(target))

  def crash_midway(path, **kwargs):
    os.makedirs(path)
    (open(os.path.join(path, "saved_model.pb"), "wb")).write(b"partial")
    raise KeyboardInterrupt

  model.export = crash_midway
  with pytest.raises(KeyboardInterrupt):
    experiment.export(model, target)
  assert sorted(os.listdir(target)) == before
  reloaded = tf.saved_model.load(target)
  assert reloaded.serve(tf.zeros([2, 4])).shape == (2, 3)


def _write(path, kind, text, fail=False):
  """Writes `text` as a file, or as a directory of two files, failing
  after the first part if told to."""
  parts = [path] if kind == "file" else [os.path.join(path, "a"),
                                         os.path.join(path, "sub", "b")]
  for part in parts:
    os.makedirs(os.path.dirname(part), exist_ok=True)
    with open(part, "w", encoding="utf-8") as stream:
      stream.write(text)
    if fail:
      raise KeyboardInterrupt


def _read(path, kind):
  if kind == "file":
    return path.read_text()
  return {str(file.relative_to(path)): file.read_text()
          for file in path.rglob("*") if file.is_file()}


@pytest.mark.parametrize("kind,name", [("file", "best.weights.h5"),
                                       ("directory", "export")])
def test_replaced_atomically_swaps_in_whole_writes_only(tmp_path, kind, name):
  path = tmp_path / name
  _write(str(path), kind, "old")
  before = _read(path, kind)
  with pytest.raises(KeyboardInterrupt):
    with training_loops.replaced_atomically(path) as temporary:
      _write(temporary, kind, "new", fail=True)
  assert _read(path, kind) == before
  assert os.listdir(tmp_path) == [name]
  with training_loops.replaced_atomically(path) as temporary:
    # Beside the target, with its name ending (Keras checks `.weights.h5`).
    assert os.path.dirname(temporary) == str(tmp_path)
    assert temporary.endswith(name) and temporary != str(path)
    _write(temporary, kind, "new")
  assert _read(path, kind) == {
      "file": "new", "directory": {"a": "new", "sub/b": "new"}}[kind]
  assert os.listdir(tmp_path) == [name]



@pytest.mark.parametrize("kind", ["file", "directory"])
def test_the_next_write_deletes_what_a_killed_writer_left(tmp_path, kind):
  """A writer killed mid-write (SIGKILL: no cleanup ran) leaves its
  temporary; the next write of the same path deletes it, and leaves
  another path's alone."""
  path = tmp_path / "results.json"
  _write(str(tmp_path / ".tmp-0123456789ab.results.json"), kind, "half")
  other = tmp_path / ".tmp-0123456789ab.history.json"
  other.write_text("half")
  training_loops.write_json_atomically(path, {"epoch": 1})
  assert sorted(os.listdir(tmp_path)) == [other.name, "results.json"]

_CRASH_MIDWAY_THROUGH_A_DIRECTORY_SWAP = """
import os, sys
import training_loops

rename, renames_left = os.replace, int(sys.argv[2])
def rename_then_maybe_die(source, target):
  global renames_left
  rename(source, target)
  renames_left -= 1
  if not renames_left:
    os._exit(9)
os.replace = rename_then_maybe_die
with training_loops.replaced_atomically(sys.argv[1]) as temporary:
  print(temporary, flush=True)
  os.makedirs(temporary)
  with open(os.path.join(temporary, "a"), "w") as stream:
    stream.write("new")
"""


@pytest.mark.parametrize("renames,survivor", [
    (1, {"a": "old", "b": "old"}),  # old one aside, the new one not in yet
    (2, {"a": "new"})])  # the new one in, the old one not yet deleted
def test_a_directory_a_crash_left_aside_comes_back_or_goes(tmp_path, renames,
                                                           survivor):
  path = tmp_path / "export"
  path.mkdir()
  (path / "a").write_text("old")
  (path / "b").write_text("old")
  crashed = subprocess.run(
      [sys.executable, "-c", _CRASH_MIDWAY_THROUGH_A_DIRECTORY_SWAP,
       str(path), str(renames)], cwd=REPO, capture_output=True, text=True,
      timeout=120)
  assert crashed.returncode == 9, crashed.stderr
  temporary = os.path.basename(crashed.stdout.strip())
  with pytest.raises(KeyboardInterrupt):
    with training_loops.replaced_atomically(path) as writing:
      _write(writing, "directory", "newer", fail=True)
  assert _read(path, "directory") == survivor
  # A process killed before its rename left its temporary behind: the next
  # write deleted it.
  assert temporary.startswith(".tmp-")
  assert os.listdir(tmp_path) == ["export"]
