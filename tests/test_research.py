"""Every research script's main end to end on tiny settings."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import training_loops
from conftest import REPO, SHARED, needs_shared
from research.experiments import (classify, deep_net, early_stopping,
                                  hparam_search, regress, wide_deep)
from research.framework import datasets, models
from research.tools import compare, evaluate

MNIST_DIR = os.path.join(SHARED, "mnist-t10k")


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
  compare.compare(
      "classify",
      compare.EXPERIMENTS["classify"].Config.resolved(
          epochs=2, output_dir=str(tmp_path), verbose=0))
  results = _results(tmp_path)
  _check_results(results, "classify", ("eager", "function", "graph",
                                       "keras_fit"), 2, {"accuracy"})
  printed = capsys.readouterr().out
  for word in ("eager", "keras_fit", "steps/s", "vs fit", "matches fit"):
    assert word in printed
  losses = [r["history"]["loss"][-1] for r in results["loops"].values()]
  assert losses == [losses[-1]] * 4  # every loop fit's, to the bit
  for loop in results["loops"]:
    assert os.path.isfile(tmp_path / f"learning_curves_{loop}.png")
    assert os.path.isdir(tmp_path / "logs" / loop / "train")


@needs_shared
@pytest.mark.parametrize("normalize", ["zscore", "none"])
def test_classify_on_real_mnist_exports_a_reloadable_model(tmp_path,
                                                           normalize):
  export_dir = tmp_path / "export"
  classify.main(
      classify.Config.resolved(
          dataset="mnist",
          data_dir=MNIST_DIR,
          loop="graph",
          epochs=1,
          normalize=normalize,
          verbose=0,
          output_dir=str(tmp_path),
          export_dir=str(export_dir)))
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
  """The test figures are the exported model's on the test split, computed
  again here with NumPy."""
  regress.main(
      regress.Config.resolved(
          loop="function", epochs=2, verbose=0, output_dir=str(tmp_path),
          export_dir=str(tmp_path / "export")))
  results = _results(tmp_path)
  _check_results(results, "regress", ["function"], 2, {"mae"})
  assert results["flags"]["dataset"] == "diabetes"
  splits = datasets.load("diabetes", seed=42)
  model = keras.models.load_model(tmp_path / "export" / "function.keras")
  errors = model.predict(splits.x_test, verbose=0).reshape(-1) - (
      splits.y_test)
  test = results["loops"]["function"]["test"]
  np.testing.assert_allclose(test["loss"], np.mean(errors ** 2), rtol=1e-5)
  np.testing.assert_allclose(test["mae"], np.mean(np.abs(errors)),
                             rtol=1e-5)


def test_callbacks_report_where_each_loop_stopped(tmp_path):
  # A learning rate of 0.3 overshoots: val_loss rises after a few epochs.
  early_stopping.main(
      early_stopping.Config.resolved(
          epochs=8,
          patience=0,
          learning_rate=0.3,
          verbose=0,
          output_dir=str(tmp_path)))
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


def _keras_gradient_norms(config):
  """The kernel-gradient norms `deep_net` reports, computed again through
  Keras' own Dense and BatchNormalization layers and Keras' loss, with the
  weights of the script's model at its seed (its input scaling and its
  dropout, whose seeded masks this repeats, are the model's own)."""
  splits = datasets.load("digits", seed=config.seed)
  keras.utils.set_random_seed(config.seed)
  ours = models.deep_classifier(
      splits.x_train, splits.num_classes, config.activation,
      config.batchnorm, config.dropout, seed=config.seed)
  stack, hidden = [], {}  # hidden: {our layer's name: Keras' layer}
  for layer in ours.layers[1:]:
    config_of = layer.get_config()
    if type(layer).__name__ == "Dense":
      theirs = keras.layers.Dense(config_of["units"],
                                  config_of["activation"])
    elif type(layer).__name__ == "BatchNormalization":
      theirs = keras.layers.BatchNormalization(
          momentum=config_of["momentum"], epsilon=config_of["epsilon"])
    else:  # no trainable weights: Flatten, the scaler, dropout
      stack.append(layer)
      continue
    theirs.build(layer.input.shape)
    theirs.set_weights(layer.get_weights())
    stack.append(theirs)
    if layer.name.startswith("hidden_"):
      hidden[layer.name] = theirs
  norms = {name: [] for name in hidden}
  size = config.batch_size
  for start in range(0, config.gradient_batches * size, size):
    x = splits.x_train[start:start + size]
    with tf.GradientTape() as tape:
      for layer in stack:
        x = layer(x, training=True)
      value = keras.losses.SparseCategoricalCrossentropy()(
          splits.y_train[start:start + size], x)
    gradients = tape.gradient(
        value, [layer.kernel for layer in hidden.values()])
    for name, gradient in zip(hidden, gradients):
      norms[name].append(float(np.linalg.norm(gradient)))
  return norms


@pytest.mark.parametrize("activation,batchnorm,dropout", [
    ("selu", False, "alpha"), ("relu", True, "standard")])
def test_deep_net_reports_gradient_norms_per_layer(tmp_path, activation,
                                                   batchnorm, dropout):
  """Per hidden layer, input side first, the norms Keras' own layers and
  loss give at the same initialization on the same batches."""
  config = deep_net.Config.resolved(
      loop="graph", epochs=1, activation=activation, batchnorm=batchnorm,
      dropout=dropout, verbose=0, gradient_batches=2,
      output_dir=str(tmp_path))
  deep_net.main(config)
  results = _results(tmp_path)
  _check_results(results, "deep_net", ["graph"], 1, {"accuracy"})
  norms = results["gradient_norms"]
  assert list(norms) == [f"hidden_{i:02d}" for i in range(1, 21)]
  expected = _keras_gradient_norms(config)
  for name, values in norms.items():
    np.testing.assert_allclose(values, expected[name], rtol=1e-6,
                               err_msg=name)
  assert results["flags"]["activation"] == activation


@pytest.mark.parametrize("variant,aux", [
    ("functional", False), ("subclassed", False), ("multi_input", True)])
def test_wide_deep_variants(tmp_path, variant, aux):
  """The test figures are the exported model's on the test split, computed
  again here with NumPy: with the auxiliary output, the loss weighs the
  two outputs' squared errors 0.9 and 0.1."""
  wide_deep.main(
      wide_deep.Config.resolved(
          loop="graph",
          epochs=2,
          wide_deep_variant=variant,
          aux_output=aux,
          verbose=0,
          output_dir=str(tmp_path),
          export_dir=str(tmp_path / "export")))
  results = _results(tmp_path)
  assert results["variant"] == variant
  test = results["loops"]["graph"]["test"]
  splits = datasets.load("diabetes", seed=42)
  model = keras.models.load_model(tmp_path / "export" / "graph.keras")
  inputs = (models.split_wide_deep(splits.x_test) if variant == "multi_input"
            else splits.x_test)
  predictions = model.predict(inputs, verbose=0)
  if not aux:
    assert set(test) == {"loss", "mae"}
    errors = predictions.reshape(-1) - splits.y_test
    np.testing.assert_allclose(test["loss"], np.mean(errors ** 2), rtol=1e-5)
    np.testing.assert_allclose(test["mae"], np.mean(np.abs(errors)),
                               rtol=1e-5)
    return
  assert set(test) == {"loss", "main_loss", "aux_loss", "main_mae"}
  main_errors, aux_errors = (predictions[name].reshape(-1) - splits.y_test
                             for name in ("main", "aux"))
  main_mse, aux_mse = np.mean(main_errors ** 2), np.mean(aux_errors ** 2)
  np.testing.assert_allclose(test["main_loss"], main_mse, rtol=1e-5)
  np.testing.assert_allclose(test["aux_loss"], aux_mse, rtol=1e-5)
  np.testing.assert_allclose(test["loss"], 0.9 * main_mse + 0.1 * aux_mse,
                             rtol=1e-5)
  np.testing.assert_allclose(test["main_mae"], np.mean(np.abs(main_errors)),
                             rtol=1e-5)


def test_hparam_search_sweeps_searches_and_logs_hparams(tmp_path):
  """The best candidate is the trial of least cross-validated MSE, and the
  test MSE is that candidate's, refitted on the training split here and
  scored with NumPy."""
  config = hparam_search.Config.resolved(
      epochs=1, sweep_points=2, search_iterations=2, cv_folds=2, verbose=0,
      output_dir=str(tmp_path))
  hparam_search.main(config)
  results = _results(tmp_path)
  rates = [row["learning_rate"] for row in results["learning_rate_sweep"]]
  np.testing.assert_allclose(rates, [1e-4, 3e-2])
  search = results["random_search"]
  assert len(search["trials"]) == 2
  best = min(search["trials"], key=lambda trial: trial["cv_mse"])
  assert search["best_params"] == best["params"]
  assert search["best_cv_mse"] == best["cv_mse"]
  splits = datasets.load("diabetes", seed=config.seed)
  refitted = hparam_search.ToolkitRegressor(
      epochs=config.epochs, batch_size=config.batch_size, loop=config.loop,
      seed=config.seed, settings=config).set_params(**best["params"]).fit(
          splits.x_train, splits.y_train)
  np.testing.assert_allclose(
      search["test_mse"],
      np.mean((refitted.predict(splits.x_test) - splits.y_test) ** 2),
      rtol=1e-6)
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


_BAD_ARGUMENTS = {
    "bad enum": (["--normalize=bogus"], "normalize"),
    "missing data dir": (["--dataset=mnist", "--data_dir=/nonexistent"],
                         "error: --data_dir '/nonexistent' is not a "
                         "directory."),
    "negative rate": (["--learning_rate=-1"],
                      "error: --learning_rate=-1.0 is out of range; "
                      "accepted: > 0."),
    "zero epochs": (["--epochs=0"], "error: --epochs=0 is out of range; "
                                    "accepted: >= 1."),
    "zero batch": (["--batch_size=0"], "error: --batch_size=0 is out of "
                                       "range; accepted: >= 1."),
    "uneven shards": (["--strategy=mirrored", "--cpu_replicas=2",
                       "--batch_size=33"],
                      "error: --batch_size=33 is not divisible by the 2 "
                      "replicas"),
    "no IDX files": (["--dataset=mnist", "--data_dir=/"],
                     "error: --data_dir '/' has no mnist IDX files"),
    "diverging": (["--learning_rate=1e4", "--loop=graph", "--epochs=2",
                   "--verbose=0"], "error: Training loss became"),
    # The fixture holds the output directory's lock meanwhile.
    "output dir in use": ([], f"is in use by the run of PID {os.getpid()}"),
    # The fixture caps the file size: run_config.json fits, the
    # checkpoint's data file does not.
    "full disk": (["--loop=graph", "--epochs=1", "--verbose=0"],
                  "/checkpoints/graph: "),
}


# In the child, by the shell rather than a `preexec_fn` (unsafe in a process
# with TensorFlow's threads): files stop growing at 49 KiB, as on a full
# disk, and the signal a process gets for it is ignored, so the write fails.
_FULL_DISK = ["bash", "-c", 'ulimit -f 49; trap "" XFSZ; exec "$@"', "bash"]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
  """Every bad invocation at once, two a core: each is a fresh process
  that mostly imports TensorFlow."""
  held = tmp_path_factory.mktemp("held")
  output_dirs = {case: held if case == "output dir in use"
                 else tmp_path_factory.mktemp("bad")
                 for case in _BAD_ARGUMENTS}
  with training_loops.RunLock(held):
    processes = {
        case: subprocess.Popen(
            [*(_FULL_DISK if case == "full disk" else []), sys.executable,
             "-m", "research", "classify", *arguments,
             f"--output_dir={output_dirs[case]}"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        for case, (arguments, _) in _BAD_ARGUMENTS.items()}
    return {case: (process.wait(timeout=300), process.stderr.read())
            for case, process in processes.items()}


@pytest.mark.parametrize("case", _BAD_ARGUMENTS)
def test_scripts_exit_with_a_clear_line(bad_runs, case):
  returncode, stderr = bad_runs[case]
  assert returncode == 1
  assert _BAD_ARGUMENTS[case][1] in stderr
  assert "Traceback" not in stderr
  if case == "full disk":
    assert re.search(r"error: Could not write \S+/checkpoints/graph: \S+; "
                     r"File too large\.$", stderr.strip())


def test_evaluate_reloads_an_exported_keras_file(tmp_path, capsys):
  export_dir = tmp_path / "export"
  classify.main(
      classify.Config.resolved(
          loop="graph",
          epochs=1,
          verbose=0,
          output_dir=str(tmp_path / "run"),
          export_dir=str(export_dir)))
  accuracy = _results(tmp_path / "run")["loops"]["graph"]["test"]["accuracy"]
  evaluate.main(
      evaluate.Config.resolved(model_path=str(export_dir / "graph.keras")))
  printed = capsys.readouterr().out
  assert f"test accuracy: {accuracy:.4f}" in printed


def test_evaluate_refuses_python_code_unless_trusted(tmp_path, capsys):
  import keras
  inputs = keras.Input((64,))
  outputs = keras.layers.Dense(10, "softmax")(
      keras.layers.Lambda(lambda x: x / 16.0)(inputs))
  path = str(tmp_path / "lambda.keras")
  keras.Model(inputs, outputs).save(path)
  with pytest.raises(SystemExit, match="contains Python code .* Pass "
                                       "--unsafe_deserialization"):
    evaluate.main(evaluate.Config.resolved(model_path=path))
  evaluate.main(
      evaluate.Config.resolved(model_path=path, unsafe_deserialization=True))
  assert "test accuracy:" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="Model file not found"):
    evaluate.main(
        evaluate.Config.resolved(model_path=str(tmp_path / "absent.keras")))


def test_a_script_trains_on_two_cpu_replicas(tmp_path):
  # A fresh process: the CPU can be split only before TensorFlow's first op.
  subprocess.run(
      [sys.executable, "-m", "research", "classify", "--strategy=mirrored",
       "--cpu_replicas=2", "--loop=graph", "--epochs=1", "--verbose=0",
       f"--output_dir={tmp_path}"], cwd=REPO, check=True, timeout=300,
      capture_output=True)
  results = _results(tmp_path)
  assert results["flags"]["strategy"] == "mirrored"
  assert results["loops"]["graph"]["test"]["accuracy"] > 0.3  # > chance


def test_classifier_dropout_is_keras_dropout_after_each_hidden_layer():
  x = np.random.default_rng(0).normal(size=(64, 8, 8)).astype("float32")
  plain = models.mlp_classifier(x, 10)
  dropped = models.mlp_classifier(x, 10, dropout_rate=0.5, seed=1)
  rates = [layer.rate for layer in dropped.layers if "dropout" in
           type(layer).__name__.lower()]
  assert rates == [0.5, 0.5]
  dropped.set_weights(plain.get_weights())
  # Inference: the identity, as Keras' Dropout; training: half the units
  # of each hidden layer zeroed, so the outputs differ.
  np.testing.assert_allclose(dropped(x, training=False),
                             plain(x, training=False), rtol=1e-6)
  assert not np.allclose(dropped(x, training=True), plain(x, training=True))
