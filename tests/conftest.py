"""Shared test setup: quiet TensorFlow, deterministic ops, small helpers."""

import gzip
import os
import struct

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.experimental.enable_op_determinism()

# Two logical CPUs, so mirrored training runs on this machine. Logical devices
# must be configured before TensorFlow runs its first op, hence here.
from training_loops.strategies import make_strategy, split_cpu  # noqa: E402

split_cpu(2)

# The repository root: where `python -m research.<script>` runs from.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The real datasets beside the repository (../shared/data/README.md).
SHARED = os.path.join(REPO, "..", "shared", "data")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED),
                                  reason="../shared/data is not here")


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def saved_and_loaded(model, tmp_path):
  """Saves `model` to a `.keras` file and loads it back (safe mode)."""
  import keras
  path = tmp_path / "model.keras"
  model.save(path)
  return keras.models.load_model(path)


@pytest.fixture(scope="session")
def mirrored():
  """The one two-replica MirroredStrategy of the session: two over the same
  devices in one process number their collectives alike and abort each
  other's all-reduces."""
  strategy = make_strategy("mirrored", cpu_replicas=2)
  assert strategy.num_replicas_in_sync == 2
  return strategy


@pytest.fixture(scope="module", autouse=True)
def fresh_keras_state():
  """Each module starts from a clear Keras session: the global state every
  model leaves behind (name counters, the default graph, kernel caches)
  otherwise grows over the suite and slows later modules down."""
  import keras
  keras.utils.clear_session()
  yield


def write_idx(path, array, magic=None, cut=0):
  """Writes `array` as a gzipped IDX file, as MNIST's are (`magic`: a
  wrong header number; `cut`: drop that many bytes from the end)."""
  header = struct.pack(">I", magic or (2048 + array.ndim))
  header += struct.pack(f">{array.ndim}I", *array.shape)
  content = header + array.astype(np.uint8).tobytes()
  with gzip.open(path, "wb") as stream:
    stream.write(content[:len(content) - cut])


def write_california_csv(directory, rng, rows, noise=0.0):
  """A synthetic `cal_housing.csv` in `directory` (made): the real file's
  columns and ranges, the house value 40000 x the median income plus
  Gaussian noise of std `noise`, clipped at 15000 as the real values are."""
  from research.framework import datasets
  table = {"longitude": rng.uniform(-124, -114, rows),
           "latitude": rng.uniform(32, 42, rows),
           "housing_median_age": rng.integers(1, 52, rows),
           "total_rooms": rng.integers(500, 5000, rows),
           "total_bedrooms": rng.integers(100, 1000, rows),
           "population": rng.integers(300, 3000, rows),
           "households": rng.integers(100, 1000, rows),
           "median_income": rng.uniform(0.5, 10, rows)}
  value = 40000 * table["median_income"]
  if noise:
    value = (value + rng.normal(0, noise, rows)).clip(15000)
  table["median_house_value"] = value
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "cal_housing.csv"), "w",
            encoding="utf-8") as stream:
    stream.write(",".join(datasets.CALIFORNIA_COLUMNS) + "\n")
    for values in zip(*(table[c] for c in datasets.CALIFORNIA_COLUMNS)):
      stream.write(",".join(f"{value:.6f}" for value in values) + "\n")


def fast_dev_run_keeps_nothing(script, output_dir, capsys, **settings):
  """Runs an experiment module's `main` with `fast_dev_run`, every loop and
  `settings` into `output_dir`: every loop's row printed, "nothing was
  kept" said, and `output_dir` not there afterwards."""
  from training_loops import LOOPS
  script.main(script.Config.resolved(
      fast_dev_run=True, loop="all", verbose=0, output_dir=str(output_dir),
      **settings))
  printed = capsys.readouterr().out
  assert "nothing was kept" in printed
  for loop in LOOPS:
    assert f"\n{loop.rjust(9)} " in printed
  assert not os.path.exists(output_dir)
