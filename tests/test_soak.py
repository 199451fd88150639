"""The fault-injection soak: runs killed at seeded points resume to the
uninterrupted run's state, and its comparison catches what a resume that is
not exact would leave."""

import json
import os
import shutil

import pytest

from research.tools import soak

# Smaller than the soak's own graph configuration: two epochs of four
# steps, a checkpoint every three.
_TINY = soak.Configuration("classify", {
    **soak.CONFIGURATIONS["graph"].settings, "epochs": 2,
    "limit_batches": 4, "checkpoint_every_steps": 3})


@pytest.fixture(scope="module")
def soaked(tmp_path_factory):
  """A trial killed in the write of results.json, before its temporary is
  renamed over it (the seed draws that point)."""
  output_dir = tmp_path_factory.mktemp("soak")
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(soak.CONFIGURATIONS, "graph", _TINY)
    trials = soak.main(soak.Config(
        configuration="graph", trials=1, seed=8, output_dir=str(output_dir),
        kill_points=("results",)))
  return output_dir / "graph", trials


def test_a_run_killed_at_a_seeded_point_resumes_to_the_uninterrupted_state(
    soaked):
  """Killed mid-write, the run left a temporary beside results.json; the
  rerun resumed, deleted it, and ended as the uninterrupted run."""
  root, (trial,) = soaked
  assert trial.hit == "results:replace#2", trial  # before the rename
  assert trial.resumed and trial.differences == (), trial
  recorded = json.loads((root / "soak.json").read_text())
  assert [entry["hit"] for entry in recorded["trials"]] == [trial.hit]
  assert soak.summary("graph", [trial]) == (
      "graph: 1 trials; killed in results 1; identical 1, differing 0, "
      "failed to resume 0")


def _copy(root, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(root / "uninterrupted", copy)
  return copy


def test_a_rerun_that_started_over_is_told_from_one_that_resumed(soaked):
  """Seeded and deterministic, a rerun that ignored the checkpoint ends
  identical: only its account of the steps it trained tells."""
  root, _ = soaked
  reference = root / "uninterrupted"
  # The uninterrupted run trained all 8 steps from no checkpoint; had the
  # kill left one after epoch 1, it should have trained 4.
  found = soak.differences(reference, reference, {"graph": {
      "epochs_done": 1, "steps_in_epoch": 0, "steps_done": 4}})
  assert found == [
      "graph: resumed from None, the checkpoint on disk was "
      "{'epoch': 1, 'step': 0}",
      "graph: trained 8 steps, 4 were left"]
  assert soak.differences(reference, reference, {}) == []


def test_differing_tensors_results_and_leftovers_are_found(soaked, tmp_path):
  root, _ = soaked
  copy = _copy(root, tmp_path)
  checkpoints = copy / "run" / "checkpoints" / "graph"
  # The state file names the latest checkpoint: point it at the one before.
  state = (checkpoints / "checkpoint").read_text()
  latest = int(state.split('"ckpt-')[1].split('"')[0])
  (checkpoints / "checkpoint").write_text(
      state.replace(f"ckpt-{latest}\"", f"ckpt-{latest - 1}\"", 1))
  results = json.loads((copy / "run" / "results.json").read_text())
  results["loops"]["graph"]["history"]["loss"][-1] += 1e-7
  (copy / "run" / "results.json").write_text(json.dumps(results))
  (copy / "run" / ".tmp-0123456789ab.results.json").write_text("{\"half")
  os.remove(copy / "run" / "learning_curves_graph.png")
  found = soak.differences(copy, root / "uninterrupted", {})
  assert found[:3] == [
      "missing: run/learning_curves_graph.png",
      "left over: run/.tmp-0123456789ab.results.json",
      "run/.tmp-0123456789ab.results.json does not parse"]
  assert found[3].startswith("graph: ") and " checkpointed tensors differ" in (
      found[3])
  assert found[4:] == ["results.json differs"]
