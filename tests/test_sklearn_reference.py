"""research.tools.sklearn_reference: scikit-learn's MLPRegressor on a run's
split, against an MLPRegressor fitted here on features standardized by
hand."""

import json

import numpy as np
import pytest
from sklearn import neural_network

from conftest import write_california_csv
from research.framework import datasets
from research.tools import sklearn_reference


def _splits(seed=0, rows=240):
  """A small regression problem on features of very different scales."""
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(rows, 4)) * [1, 10, 100, 1000] + [0, 5, -50, 3000]
       ).astype("float32")
  y = (x[:, 0] + x[:, 1] / 10 - (x[:, 2] / 100) ** 2
       + rng.normal(0, 0.1, rows)).astype("float32")
  return datasets._split(x, y, False, seed, 0.1, 0.2)


def _independent_mse(splits, sizes, seed, max_iter):
  """Test MSE of MLPRegressor fitted on the training split's z-scores
  (population statistics, by hand)."""
  mean = splits.x_train.mean(axis=0, dtype=np.float64)
  std = splits.x_train.std(axis=0, dtype=np.float64)
  def scaled(x):
    return ((x - mean) / std).astype("float32")
  model = neural_network.MLPRegressor(hidden_layer_sizes=sizes,
                                      random_state=seed, max_iter=max_iter)
  model.fit(scaled(splits.x_train), splits.y_train)
  return float(np.mean((model.predict(scaled(splits.x_test))
                        - splits.y_test) ** 2))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_fit_reference_is_mlpregressor_on_the_standardized_split():
  splits = _splits()
  models = sklearn_reference.fit_reference(splits, seed=3, max_iter=15)
  assert [m["hidden_layer_sizes"] for m in models] == [[30], [100, 100, 100]]
  for model in models:
    expected = _independent_mse(splits, tuple(model["hidden_layer_sizes"]),
                                seed=3, max_iter=15)
    assert model["test_mse"] == pytest.approx(expected, rel=1e-3)
    assert model["iterations"] == 15 and not model["converged"]
  # Seeded with the seed given: another seed, other weights.
  other = sklearn_reference.fit_reference(splits, seed=4, max_iter=15)
  assert other[0]["test_mse"] != pytest.approx(models[0]["test_mse"],
                                                rel=1e-3)


def test_fit_reference_says_when_a_model_converged():
  splits = _splits()
  models = sklearn_reference.fit_reference(splits, seed=0, max_iter=5000)
  for model in models:
    assert model["converged"] and model["iterations"] < 5000


def _write_california(directory, rows=200):
  write_california_csv(directory, np.random.default_rng(1), rows)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_reference_fits_the_runs_split_once_per_settings(tmp_path,
                                                         monkeypatch):
  data_dir = tmp_path / "california-housing"
  _write_california(data_dir)
  directory = tmp_path / "runs" / "sklearn_reference"
  results = sklearn_reference.reference(str(directory), "california_housing",
                                        str(data_dir), 7, 10)
  splits = datasets.load("california_housing", str(data_dir), 7)
  assert results["data"] == splits.sizes
  assert results["settings"]["seed"] == 7
  assert results["settings"]["max_iter"] == 10
  for model in results["models"]:
    assert model["test_mse"] == pytest.approx(_independent_mse(
        splits, tuple(model["hidden_layer_sizes"]), 7, 10), rel=1e-3)
  with open(directory / "results.json", encoding="utf-8") as stream:
    assert json.load(stream) == results

  # A rerun with the same settings reads the file; other settings refit.
  def refuse(*args, **kwargs):
    raise AssertionError("refitted")
  monkeypatch.setattr(sklearn_reference, "fit_reference", refuse)
  assert sklearn_reference.reference(
      str(directory), "california_housing", str(data_dir), 7, 10) == results
  with pytest.raises(AssertionError, match="refitted"):
    sklearn_reference.reference(str(directory), "california_housing",
                                str(data_dir), 8, 10)


def test_describe():
  assert sklearn_reference.describe([30]) == "one hidden layer of 30"
  assert (sklearn_reference.describe((100, 100, 100))
          == "three hidden layers of 100")
  assert sklearn_reference.describe((64, 32)) == "hidden layers of 64+32"
