"""research/: datasets against hand-made files and the shared real data,
and every script's main end to end on tiny settings."""

import gzip
import json
import os
import struct
import subprocess
import sys

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf

import training_loops
from research import (callbacks, classify, compare, datasets, deep_net,
                      evaluate, hparam_search, regress, wide_deep)

flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data")
MNIST_DIR = os.path.join(SHARED, "mnist-t10k")
CALIFORNIA_DIR = os.path.join(SHARED, "california-housing")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED),
                                  reason="../shared/data is not here")


# ------------------------------------------------------------------ IDX


def _write_idx(path, array, magic=None, cut=0):
  header = struct.pack(">I", magic or (2048 + array.ndim))
  header += struct.pack(f">{array.ndim}I", *array.shape)
  content = header + array.astype(np.uint8).tobytes()
  with gzip.open(path, "wb") as stream:
    stream.write(content[:len(content) - cut])


def test_idx_reader_round_trips_generated_files(tmp_path):
  images = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
  labels = np.array([7, 1])
  _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
  _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
  read_images, read_labels = datasets.read_idx_pair(str(tmp_path), "train")
  np.testing.assert_array_equal(read_images, images)
  np.testing.assert_array_equal(read_labels, labels)


@pytest.mark.parametrize("damage,match", [
    (dict(magic=1234), "bad IDX magic number 1234"),
    (dict(cut=5), r"header says \(2, 3, 4\) = 24 bytes of data, the file "
                  "has 19"),
    (dict(cut=30), "truncated IDX header|too short")])
def test_idx_reader_rejects_corrupt_files(tmp_path, damage, match):
  path = tmp_path / "bad-images-idx3-ubyte.gz"
  _write_idx(path, np.zeros((2, 3, 4)), **damage)
  with pytest.raises(datasets.DataError, match=match):
    datasets.read_idx(str(path))


def test_idx_reader_names_unreadable_and_missing_files(tmp_path):
  whole = tmp_path / "whole.gz"
  _write_idx(whole, np.zeros((50, 28, 28)))
  truncated = tmp_path / "truncated.gz"
  truncated.write_bytes(whole.read_bytes()[:40])  # a cut gzip stream
  with pytest.raises(datasets.DataError, match="truncated.gz: not a readable"):
    datasets.read_idx(str(truncated))
  (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
  with pytest.raises(datasets.DataError, match="plain.gz: not a readable"):
    datasets.read_idx(str(tmp_path / "plain.gz"))
  with pytest.raises(datasets.DataError, match="IDX file not found"):
    datasets.read_idx(str(tmp_path / "absent.gz"))
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 2, 2)))
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4))
  with pytest.raises(datasets.DataError, match="3 images but 4 labels"):
    datasets.read_idx_pair(str(tmp_path), "t10k")
  with pytest.raises(datasets.DataError, match="not a directory"):
    datasets.load("mnist", str(tmp_path / "nowhere"))


@needs_shared
def test_real_mnist_test_set_and_its_stratified_split():
  images, labels = datasets.read_idx_pair(MNIST_DIR, "t10k")
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  # Class counts from ../shared/data/README.md.
  np.testing.assert_array_equal(np.bincount(labels), [
      980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
  splits = datasets.load("mnist", MNIST_DIR, seed=0)
  assert splits.sizes == {"train": 8000, "validation": 1000, "test": 1000}
  assert splits.num_classes == 10
  for part in (splits.y_val, splits.y_test):  # stratified: same proportions
    np.testing.assert_allclose(np.bincount(part) / len(part),
                               np.bincount(labels) / len(labels), atol=2e-3)
  again = datasets.load("mnist", MNIST_DIR, seed=0)
  np.testing.assert_array_equal(again.y_test, splits.y_test)


# ----------------------------------------------------------- California


def test_california_features_against_hand_computed_rows(tmp_path):
  # Columns deliberately out of the StatLib order.
  path = tmp_path / "cal_housing.csv"
  path.write_text(
      "median_house_value,longitude,latitude,housing_median_age,"
      "total_rooms,total_bedrooms,population,households,median_income\n"
      "452600,-122.23,37.88,41,880,129,322,126,8.3252\n"
      "100000,-118.0,34.0,10,1000,200,500,250,2.5\n")
  features, target = datasets.read_california_csv(str(path))
  expected = np.array([
      [8.3252, 41, 880 / 126, 129 / 126, 322, 322 / 126, 37.88, -122.23],
      [2.5, 10, 4.0, 0.8, 500, 2.0, 34.0, -118.0]], np.float32)
  np.testing.assert_allclose(features, expected, rtol=1e-6)
  np.testing.assert_allclose(target, [4.526, 1.0], rtol=1e-6)


@pytest.mark.parametrize("content,match", [
    ("longitude,latitude\n1,2\n", "missing column"),
    ("longitude,latitude,housing_median_age,total_rooms,total_bedrooms,"
     "population,households,median_income,median_house_value\n"
     "1,2,3,4,x,6,7,8,9\n", r":2: column total_bedrooms is not a number"),
    ("longitude,latitude,housing_median_age,total_rooms,total_bedrooms,"
     "population,households,median_income,median_house_value\n"
     "1,2,3,4,5,6,7,8,9\n1,2,3,4,5,nan,7,8,9\n",
     r":3: column population is nan")])
def test_california_csv_errors_name_row_and_column(tmp_path, content, match):
  path = tmp_path / "cal_housing.csv"
  path.write_text(content)
  with pytest.raises(datasets.DataError, match=match):
    datasets.read_california_csv(str(path))


@needs_shared
def test_real_california_csv_matches_scikit_learns_first_row():
  features, target = datasets.read_california_csv(
      os.path.join(CALIFORNIA_DIR, "cal_housing.csv"))
  assert features.shape == (20640, 8)
  # fetch_california_housing().data[0] and .target[0], as documented.
  np.testing.assert_allclose(features[0], [
      8.3252, 41.0, 6.98412698, 1.02380952, 322.0, 2.55555556, 37.88,
      -122.23], rtol=1e-6)
  np.testing.assert_allclose(target[0], 4.526, rtol=1e-6)
  assert 0.14 < target.min() and target.max() < 5.01


# -------------------------------------------------------------- scripts


def _results(output_dir):
  with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as f:
    return json.load(f)


def _check_results(results, experiment, loops, epochs, metrics=()):
  assert results["experiment"] == experiment
  assert set(results["versions"]) >= {"tensorflow", "keras", "numpy"}
  assert results["seed"] == results["flags"]["seed"]
  assert list(results["loops"]) == list(loops)
  for report in results["loops"].values():
    assert len(report["history"]["loss"]) == epochs
    assert set(report["test"]) == {"loss", *metrics}
    assert report["steps_per_second"] > 0
    assert all(np.isfinite(report["history"]["loss"]))


def test_compare_runs_every_loop_side_by_side(tmp_path, capsys):
  with flagsaver.flagsaver(epochs=2, output_dir=str(tmp_path), verbose=0):
    compare.main(["compare"])
  results = _results(tmp_path)
  _check_results(results, "classify", ("eager", "function", "graph",
                                       "keras_fit"), 2, {"accuracy"})
  printed = capsys.readouterr().out
  for word in ("eager", "keras_fit", "steps/s", "vs fit", "matches fit"):
    assert word in printed
  losses = [r["history"]["loss"][-1] for r in results["loops"].values()]
  np.testing.assert_allclose(losses, losses[-1], rtol=1e-3)
  for loop in results["loops"]:
    assert os.path.isfile(tmp_path / f"learning_curves_{loop}.png")
    assert os.path.isdir(tmp_path / "logs" / loop / "train")


@needs_shared
@pytest.mark.parametrize("normalize", ["zscore", "none"])
def test_classify_on_real_mnist_exports_a_reloadable_model(tmp_path,
                                                           normalize):
  export_dir = tmp_path / "export"
  with flagsaver.flagsaver(dataset="mnist", data_dir=MNIST_DIR, loop="graph",
                           epochs=1, normalize=normalize, verbose=0,
                           output_dir=str(tmp_path), export_dir=str(
                               export_dir)):
    classify.main(["classify"])
  results = _results(tmp_path)
  _check_results(results, "classify", ["graph"], 1, {"accuracy"})
  assert results["normalize"] == normalize
  reloaded = tf.saved_model.load(str(export_dir / "graph"))
  splits = datasets.load("mnist", MNIST_DIR, seed=42)
  probabilities = reloaded.serve(splits.x_test).numpy()
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
  accuracy = np.mean(probabilities.argmax(axis=1) == splits.y_test)
  np.testing.assert_allclose(accuracy,
                             results["loops"]["graph"]["test"]["accuracy"],
                             atol=1e-6)


def test_regress_reports_test_mse(tmp_path):
  with flagsaver.flagsaver(loop="function", epochs=2, verbose=0,
                           output_dir=str(tmp_path)):
    regress.main(["regress"])
  results = _results(tmp_path)
  _check_results(results, "regress", ["function"], 2, {"mae"})
  assert results["flags"]["dataset"] == "diabetes"


def test_callbacks_report_where_each_loop_stopped(tmp_path):
  # A learning rate of 0.3 overshoots: val_loss rises after a few epochs.
  with flagsaver.flagsaver(epochs=8, patience=0, learning_rate=0.3,
                           verbose=0, output_dir=str(tmp_path)):
    callbacks.main(["callbacks"])
  results = _results(tmp_path)
  stops = set()
  for loop, report in results["loops"].items():
    val_loss = report["history"]["val_loss"]
    # Patience 0: the first epoch whose val_loss is not a new minimum.
    first_setback = next(i for i in range(1, len(val_loss))
                         if val_loss[i] >= min(val_loss[:i]))
    assert report["stopped_epoch"] == first_setback, loop
    assert report["epochs_run"] == first_setback + 1 < 8
    assert os.path.isfile(tmp_path / "best" / f"{loop}.weights.h5"), loop
    stops.add(first_setback)
  assert len(stops) == 1  # our callbacks and Keras' stop alike


@pytest.mark.parametrize("activation,batchnorm,dropout", [
    ("selu", False, "alpha"), ("relu", True, "standard")])
def test_deep_net_reports_gradient_norms_per_layer(tmp_path, activation,
                                                   batchnorm, dropout):
  with flagsaver.flagsaver(loop="graph", epochs=1, activation=activation,
                           batchnorm=batchnorm, dropout=dropout, verbose=0,
                           gradient_batches=2, output_dir=str(tmp_path)):
    deep_net.main(["deep_net"])
  results = _results(tmp_path)
  _check_results(results, "deep_net", ["graph"], 1, {"accuracy"})
  norms = results["gradient_norms"]
  assert list(norms) == [f"hidden_{i:02d}" for i in range(1, 21)]
  assert all(len(v) == 2 and all(n > 0 for n in v) for v in norms.values())
  assert results["flags"]["activation"] == activation


@pytest.mark.parametrize("variant,aux", [
    ("functional", False), ("subclassed", False), ("multi_input", True)])
def test_wide_deep_variants(tmp_path, variant, aux):
  with flagsaver.flagsaver(loop="graph", epochs=2, wide_deep_variant=variant,
                           aux_output=aux, verbose=0,
                           output_dir=str(tmp_path)):
    wide_deep.main(["wide_deep"])
  results = _results(tmp_path)
  report = results["loops"]["graph"]
  expected = {"loss", "main_loss", "aux_loss", "main_mae"} if aux else {
      "loss", "mae"}
  assert set(report["test"]) == expected
  assert results["variant"] == variant


def test_hparam_search_sweeps_searches_and_logs_hparams(tmp_path):
  with flagsaver.flagsaver(epochs=1, sweep_points=2, search_iterations=2,
                           cv_folds=2, verbose=0, output_dir=str(tmp_path)):
    hparam_search.main(["hparam_search"])
  results = _results(tmp_path)
  rates = [row["learning_rate"] for row in results["learning_rate_sweep"]]
  np.testing.assert_allclose(rates, [1e-4, 3e-2])
  search = results["random_search"]
  assert set(search["best_params"]) == {"hidden_layers", "units",
                                        "learning_rate"}
  assert len(search["trials"]) == 2 and np.isfinite(search["test_mse"])
  assert len(os.listdir(tmp_path / "hparams")) == 4  # 2 sweep + 2 search
  assert results["flags"]["cv_folds"] == 2


def test_toolkit_regressor_is_a_scikit_learn_estimator():
  from sklearn import base
  estimator = hparam_search.ToolkitRegressor(units=7, epochs=1)
  assert base.clone(estimator).get_params()["units"] == 7
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 3)).astype("float32")
  y = x @ np.array([1.0, -2.0, 0.5], np.float32)
  assert estimator.fit(x, y).predict(x).shape == (64,)


def test_rerun_refuses_an_output_dir_with_other_flags(tmp_path):
  with flagsaver.flagsaver(loop="graph", epochs=1, verbose=0,
                           output_dir=str(tmp_path)):
    regress.main(["regress"])
  with flagsaver.flagsaver(loop="graph", epochs=1, verbose=0, seed=7,
                           output_dir=str(tmp_path)):
    with pytest.raises(SystemExit, match="seed: 42 then, 7 now"):
      regress.main(["regress"])


class _TrainingStarted(Exception):
  pass


@pytest.fixture
def no_training(monkeypatch):
  """Scripts stop where training would start: after claiming the output
  dir, which is all the tests of run_config.json need."""
  def refuse(*args, **kwargs):
    raise _TrainingStarted
  monkeypatch.setattr(training_loops, "train", refuse)


def _run_until_training(script, **flag_values):
  with flagsaver.flagsaver(loop="graph", epochs=1, verbose=0, **flag_values):
    script.main([script.__name__])


# What run_config.json records besides a script's own flags: the shared
# flags a rerun may not change.
_SHARED = {"experiment", "dataset", "loop", "batch_size", "learning_rate",
           "seed", "strategy", "cpu_replicas", "data_dir"}


@pytest.mark.parametrize("script,own", [
    (classify, {"normalize"}), (callbacks, {"patience"}), (regress, set()),
    (deep_net, {"activation", "batchnorm", "dropout", "gradient_batches"}),
    (wide_deep, {"wide_deep_variant", "aux_output"}),
    (hparam_search, {"sweep_points", "search_iterations", "cv_folds"}),
    (compare, {"experiment", "normalize"})])  # its own and classify's
def test_run_config_records_the_scripts_own_flags(tmp_path, no_training,
                                                  script, own):
  with pytest.raises(_TrainingStarted):
    _run_until_training(script, output_dir=str(tmp_path))
  recorded = json.loads((tmp_path / "run_config.json").read_text())
  assert set(recorded) == _SHARED | own
  for name in own:
    assert recorded[name] == flags.FLAGS[name].value


@pytest.mark.parametrize("script,flag,first,rerun,fixed", [
    (classify, "normalize", "minmax", "zscore", {}),
    (deep_net, "activation", "relu", "selu", {}),
    (deep_net, "batchnorm", False, True, {}),
    (deep_net, "dropout", "none", "alpha", {}),
    (deep_net, "gradient_batches", 1, 2, {}),
    (wide_deep, "wide_deep_variant", "functional", "subclassed", {}),
    (wide_deep, "aux_output", False, True,
     {"wide_deep_variant": "multi_input"}),
    (callbacks, "patience", 5, 3, {}),
    (hparam_search, "sweep_points", 2, 3, {}),
    (hparam_search, "search_iterations", 2, 3, {}),
    (hparam_search, "cv_folds", 2, 3, {}),
    (compare, "experiment", "classify", "callbacks", {})])
def test_rerun_refuses_a_change_of_any_script_flag(tmp_path, no_training,
                                                   script, flag, first,
                                                   rerun, fixed):
  with pytest.raises(_TrainingStarted):
    _run_until_training(script, output_dir=str(tmp_path), **fixed,
                        **{flag: first})
  with pytest.raises(SystemExit) as refused:
    _run_until_training(script, output_dir=str(tmp_path), **fixed,
                        **{flag: rerun})
  line = str(refused.value)
  assert line.startswith("error: ") and "\n" not in line
  assert f"{flag}: {first!r} then, {rerun!r} now" in line


@pytest.mark.parametrize("arguments,message", [
    (["--normalize=bogus"], "normalize"),
    (["--dataset=mnist", "--data_dir=/nonexistent"],
     "error: --data_dir '/nonexistent' is not a directory."),
    (["--learning_rate=-1"], "--learning_rate must be positive"),
    (["--epochs=0"], "epochs"),
    (["--batch_size=0"], "batch_size"),
    (["--strategy=mirrored", "--cpu_replicas=2", "--batch_size=33"],
     "error: --batch_size=33 is not divisible by the 2 replicas"),
    (["--dataset=mnist", "--data_dir=/"],
     "error: --data_dir '/' has no mnist IDX files"),
    (["--learning_rate=1e4", "--loop=graph", "--epochs=2", "--verbose=0"],
     "error: Training loss became")])
def test_scripts_exit_with_a_clear_line(tmp_path, arguments, message):
  process = subprocess.run(
      [sys.executable, "-m", "research.classify", *arguments,
       f"--output_dir={tmp_path}"], cwd=REPO, capture_output=True,
      text=True, timeout=120)
  assert process.returncode == 1
  assert message in process.stderr
  assert "Traceback" not in process.stderr


def test_evaluate_reloads_an_exported_keras_file(tmp_path, capsys):
  export_dir = tmp_path / "export"
  with flagsaver.flagsaver(loop="graph", epochs=1, verbose=0,
                           output_dir=str(tmp_path / "run"),
                           export_dir=str(export_dir)):
    classify.main(["classify"])
  accuracy = _results(tmp_path / "run")["loops"]["graph"]["test"]["accuracy"]
  with flagsaver.flagsaver(model_path=str(export_dir / "graph.keras")):
    evaluate.main(["evaluate"])
  printed = capsys.readouterr().out
  assert f"test accuracy: {accuracy:.4f}" in printed


def test_evaluate_refuses_python_code_unless_trusted(tmp_path, capsys):
  import keras
  inputs = keras.Input((64,))
  outputs = keras.layers.Dense(10, "softmax")(
      keras.layers.Lambda(lambda x: x / 16.0)(inputs))
  path = str(tmp_path / "lambda.keras")
  keras.Model(inputs, outputs).save(path)
  with flagsaver.flagsaver(model_path=path):
    with pytest.raises(SystemExit, match="contains Python code .* Pass "
                                         "--unsafe_deserialization"):
      evaluate.main(["evaluate"])
  with flagsaver.flagsaver(model_path=path, unsafe_deserialization=True):
    evaluate.main(["evaluate"])
  assert "test accuracy:" in capsys.readouterr().out
  with flagsaver.flagsaver(model_path=str(tmp_path / "absent.keras")):
    with pytest.raises(SystemExit, match="Model file not found"):
      evaluate.main(["evaluate"])


def test_a_script_trains_on_two_cpu_replicas(tmp_path):
  # A fresh process: the CPU can be split only before TensorFlow's first op.
  subprocess.run(
      [sys.executable, "-m", "research.classify", "--strategy=mirrored",
       "--cpu_replicas=2", "--loop=graph", "--epochs=1", "--verbose=0",
       f"--output_dir={tmp_path}"], cwd=REPO, check=True, timeout=300,
      capture_output=True)
  results = _results(tmp_path)
  assert results["flags"]["strategy"] == "mirrored"
  assert results["loops"]["graph"]["test"]["accuracy"] > 0.3  # > chance
