"""Writes that a crash cannot leave half done."""

import json
import os


def write_json_atomically(path, content, indent=None):
  """Writes `content` as JSON to a temporary file, syncs it, and renames it
  over `path`: readers see the old file or the new one, never a torn one."""
  temporary = f"{path}.tmp"
  try:
    with open(temporary, "w", encoding="utf-8") as stream:
      json.dump(content, stream, indent=indent, sort_keys=indent is not None)
      stream.flush()
      os.fsync(stream.fileno())
  except BaseException:
    os.remove(temporary)
    raise
  os.replace(temporary, path)
