"""scikit-learn's `MLPRegressor` on the split and standardized features a
course regression run used: the reference the report prints beside the
course net's test MSE, fitted in the report's own run (not a figure copied
from elsewhere).

`fit_reference` fits one `MLPRegressor` per entry of `HIDDEN_LAYER_SIZES`
(the rest scikit-learn's defaults: Adam, ReLU, `alpha=1e-4`, batches of
200), seeded with the run's seed, on the run's training split, features
standardized on that split as the course net's `Standardize` layer does
(population statistics); it reports each model's MSE on the run's test split.
`reference` does the same into `<directory>/results.json`, and reads that
file back instead when it holds the same settings, as a rerun of the report
resumes its other runs.
"""

import json
import os
import time
import warnings

import numpy as np
import sklearn
from sklearn import exceptions, metrics, neural_network, pipeline, \
    preprocessing

import training_loops
from research.framework import datasets

# One hidden layer of 30 (the course net's size), and three of 100.
HIDDEN_LAYER_SIZES = ((30,), (100, 100, 100))

# scikit-learn's own default; the report's --quick fits this many instead.
MAX_ITER = 200
QUICK_MAX_ITER = 20


def fit_reference(splits, seed, max_iter):
  """Fits each of `HIDDEN_LAYER_SIZES` on `splits`; a list of
  `{"hidden_layer_sizes", "test_mse", "iterations", "converged",
  "seconds"}`.

  Args:
    splits: a regression `datasets.Splits`; its validation split is unused
      (the course net only monitors it).
    seed: every model's `random_state`.
    max_iter: the most epochs of Adam each model runs; `converged` says
      whether it stopped earlier, on scikit-learn's `tol`.
  """
  models = []
  for sizes in HIDDEN_LAYER_SIZES:
    model = pipeline.make_pipeline(
        preprocessing.StandardScaler(),
        neural_network.MLPRegressor(hidden_layer_sizes=sizes,
                                    random_state=seed, max_iter=max_iter))
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", exceptions.ConvergenceWarning)
      model.fit(splits.x_train, splits.y_train)
    seconds = time.monotonic() - start
    converged = not any(issubclass(warning.category,
                                   exceptions.ConvergenceWarning)
                        for warning in caught)
    mse = metrics.mean_squared_error(splits.y_test,
                                     model.predict(splits.x_test))
    models.append({"hidden_layer_sizes": list(sizes),
                   "test_mse": float(mse),
                   "iterations": int(model[-1].n_iter_),
                   "converged": converged, "seconds": seconds})
  return models


def reference(directory, dataset, data_dir, seed, max_iter):
  """`fit_reference` on `datasets.load(dataset, data_dir, seed)`, the split
  a run with those flags trains and tests on, written to
  `directory/results.json`; read back from there when it holds these
  settings already.

  Returns:
    `{"experiment", "settings", "data", "versions", "models"}`, `models`
    as `fit_reference` returns them.
  """
  settings = {"dataset": dataset, "data_dir": data_dir, "seed": seed,
              "max_iter": max_iter,
              "hidden_layer_sizes": [list(sizes)
                                     for sizes in HIDDEN_LAYER_SIZES]}
  path = os.path.join(directory, "results.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as stream:
      recorded = json.load(stream)
    if recorded.get("settings") == settings:
      return recorded
  splits = datasets.load(dataset, data_dir, seed)
  results = {"experiment": "sklearn_reference", "settings": settings,
             "data": splits.sizes,
             "versions": {"scikit-learn": sklearn.__version__,
                          "numpy": np.__version__},
             "models": fit_reference(splits, seed, max_iter)}
  os.makedirs(directory, exist_ok=True)
  training_loops.write_json_atomically(path, results, indent=2)
  return results


def describe(sizes):
  """`(30,)` as "one hidden layer of 30", `(100, 100, 100)` as "three
  hidden layers of 100"."""
  count = len(sizes)
  words = {1: "one", 2: "two", 3: "three", 4: "four"}
  if len(set(sizes)) == 1:
    return (f"{words.get(count, count)} hidden layer{'s' * (count > 1)} "
            f"of {sizes[0]}")
  return f"hidden layers of {'+'.join(map(str, sizes))}"
