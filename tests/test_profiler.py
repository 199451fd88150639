"""`ProfileEpoch`: a profiler trace of one epoch's training in every loop."""

import collections

import pytest

import training_loops
from loop_models import classification_data, run_loop


def _executed_functions(log_dir):
  """How often each `tf.function` ran in the one profiler trace under
  `log_dir`, by name without its tracing suffix."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  (trace,) = log_dir.rglob("*.xplane.pb")
  space = xplane_pb2.XSpace.FromString(trace.read_bytes())
  prefix = "EagerLocalExecute: __inference_"
  names = [metadata.name for plane in space.planes
           for line in plane.lines for event in line.events
           for metadata in [plane.event_metadata[event.metadata_id]]]
  return collections.Counter(name[len(prefix):].rsplit("_", 1)[0]
                             for name in names if name.startswith(prefix))


@pytest.mark.parametrize("loop, function, calls_per_epoch", [
    ("function", "train_next", lambda steps: steps + 1),  # + the end's fetch
    ("graph", "train_steps", lambda steps: 1),
    ("keras_fit", "multi_step_on_iterator", lambda steps: steps)])
def test_profile_epoch_traces_one_epochs_training_only(
    loop, function, calls_per_epoch, tmp_path):
  data = classification_data()
  run_loop(loop, epochs=3, data=data,
           validation_data=classification_data(examples=20, seed=1),
           callbacks=[training_loops.ProfileEpoch(tmp_path, epoch=1)])
  # Neither the other epochs' steps nor validation's.
  assert _executed_functions(tmp_path) == {
      function: calls_per_epoch(int(data.cardinality()))}
