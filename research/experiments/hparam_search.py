"""Hyperparameter search for the regression MLP: a sweep, a random search.

(a) a sweep over learning rates from 1e-4 to 3e-2 with the chosen loop;
(b) scikit-learn's RandomizedSearchCV over hidden layers, units and learning
    rate, cross-validated on the training split, through `ToolkitRegressor`.

Every trial is logged as a TensorBoard HParams run, so trials compare in
TensorBoard's HParams tab:

    python -m research hparam_search --dataset=california_housing \\
        --data_dir=../shared/data/california-housing
    tensorboard --logdir runs/hparam_search/hparams
"""

import dataclasses
import math
import os
import tempfile
from typing import ClassVar

import keras
import numpy as np
from scipy import stats
from sklearn import base, model_selection
import tensorflow as tf

import losses
import training_loops
from research.experiments import regress
from research.framework import (datasets, experiment, models, optimizers,
                                run_config, summaries)

# California housing's recipe: Adam with a cosine schedule to 0, twice the
# epochs and candidates.
CALIFORNIA_RECIPE = {"optimizer": "adam", "lr_schedule": "cosine",
                     "epochs": 40, "search_iterations": 12}

SWEEP_RANGE = (1e-4, 3e-2)


@dataclasses.dataclass(frozen=True)
class Config(run_config.RunConfig):
  dataset: str = "diabetes"
  loop: str = "graph"
  sweep_points: int = run_config.setting(
      5, "Learning rates in the sweep (log-spaced over [1e-4, 3e-2]).",
      at_least=2)
  search_iterations: int = run_config.setting(
      6, "RandomizedSearchCV candidates.", at_least=1)
  cv_folds: int = run_config.setting(3, "Cross-validation folds.",
                                     at_least=2)

  RECIPES: ClassVar[dict] = {
      "dataset": {"california_housing": CALIFORNIA_RECIPE}}


class ToolkitRegressor(base.RegressorMixin, base.BaseEstimator):
  """A scikit-learn regressor around `models.regressor`, trained by
  `training_loops.train` with any loop.

  keras.wrappers.SKLearnRegressor would only ever call `model.fit`; this
  wrapper lets the search run the loop under study, with the optimizer and
  precision the run's config names (`settings`: a `run_config.RunConfig`;
  None: plain SGD in float32) at the candidate's learning rate, its schedule
  spanning the run's `--epochs`. The batch limits and the step cadence are
  the sweep's; cross-validation trains on every batch.
  """

  def __init__(self, hidden_layers=1, units=30, learning_rate=3e-3,
               epochs=10, batch_size=32, loop="graph", seed=42,
               settings=None):
    self.hidden_layers = hidden_layers
    self.units = units
    self.learning_rate = learning_rate
    self.epochs = epochs
    self.batch_size = batch_size
    self.loop = loop
    self.seed = seed
    self.settings = settings

  def fit(self, x, y):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    keras.utils.set_random_seed(self.seed)
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
        len(y), seed=self.seed).batch(self.batch_size).with_options(
            experiment.IN_MEMORY_DATA_OPTIONS)
    if self.settings is None:
      optimizer_fn = lambda: keras.optimizers.SGD(self.learning_rate)
      precision = "float32"
    else:
      optimizer_fn = optimizers.optimizer_fn(
          dataclasses.replace(self.settings,
                              learning_rate=self.learning_rate),
          math.ceil(len(y) / self.batch_size), self.settings.epochs)
      precision = self.settings.precision
    with experiment.dtype_policy(precision):
      self.history_ = training_loops.train(
          lambda: models.regressor(x, self.hidden_layers, self.units),
          optimizer_fn, losses.MeanSquaredError(), data, loop=self.loop,
          epochs=self.epochs, seed=self.seed, verbose=0)
    self.model_ = self.history_.model
    return self

  def predict(self, x):
    # A direct call: `model.predict` would trace a new function per model.
    return self.model_(np.asarray(x, np.float32), training=False).numpy(
    ).ravel()


def learning_rate_sweep(config, output_dir, strategy):
  """Trains the regressor under `strategy` at `config.sweep_points`
  learning rates; returns a row per rate."""
  rows = []
  rates = np.geomspace(*SWEEP_RANGE, config.sweep_points)
  for index, learning_rate in enumerate(rates):
    trial = dataclasses.replace(
        config, learning_rate=float(learning_rate),
        output_dir=os.path.join(output_dir, f"sweep_{index}"),
        export_dir=None)
    try:
      results = experiment.run(regress.build(trial), trial, strategy)
    except training_loops.NonFiniteLossError as error:  # a result, too
      row = {"learning_rate": float(learning_rate), "val_loss": np.inf,
             "test_loss": np.inf, "diverged": str(error)}
    else:
      report = results["loops"][config.loop]
      row = {"learning_rate": float(learning_rate),
             "val_loss": report["history"]["val_loss"][-1],
             "test_loss": report["test"]["loss"]}
    rows.append(row)
    summaries.log_hparams(
        os.path.join(output_dir, "hparams", f"sweep_{index}"),
        {"learning_rate": row["learning_rate"]}, {"val_loss": row["val_loss"]})
  return rows


def randomized_search(config, output_dir):
  """RandomizedSearchCV on the training split; the best model's test MSE."""
  splits = datasets.load_for("regression", config)
  search = model_selection.RandomizedSearchCV(
      ToolkitRegressor(epochs=1 if config.fast_dev_run else
                       config.epochs, batch_size=config.batch_size,
                       loop=config.loop, seed=config.seed,
                       settings=config),
      {"hidden_layers": [0, 1, 2, 3], "units": list(range(1, 101)),
       "learning_rate": stats.loguniform(3e-4, 3e-2)},
      n_iter=config.search_iterations, cv=config.cv_folds,
      scoring="neg_mean_squared_error", random_state=config.seed,
      error_score=-np.inf, refit=True)  # a diverged candidate scores -inf
  search.fit(splits.x_train, splits.y_train)
  trials = []
  for index, params in enumerate(search.cv_results_["params"]):
    cv_mse = -float(search.cv_results_["mean_test_score"][index])
    trials.append({"params": _plain(params), "cv_mse": cv_mse})
    summaries.log_hparams(
        os.path.join(output_dir, "hparams", f"search_{index}"),
        _plain(params), {"cv_mse": cv_mse})
  test_mse = float(np.mean(np.square(
      search.best_estimator_.predict(splits.x_test) - splits.y_test)))
  return {"best_params": _plain(search.best_params_),
          "best_cv_mse": -float(search.best_score_), "test_mse": test_mse,
          "trials": trials}


def _plain(params):
  return {key: value.item() if hasattr(value, "item") else value
          for key, value in params.items()}


def _sweep_and_search_run(config, strategy):
  if config.loop == "all":
    raise run_config.SettingsError(
        "hparam_search trains one loop per trial; accepted: --loop=eager, "
        "function, graph or keras_fit.")
  if config.fast_dev_run:  # the smallest sweep and search, then gone
    config = dataclasses.replace(config, sweep_points=2, search_iterations=1,
                                 cv_folds=2)
    with tempfile.TemporaryDirectory(prefix="fast_dev_run_") as scratch:
      sweep_and_search(config, strategy, scratch)
    print("fast_dev_run: the sweep and the search ran; nothing was kept.")
  else:
    sweep_and_search(config, strategy, config.output_dir
                     or os.path.join("runs", "hparam_search"))


def sweep_and_search(config, strategy, output_dir):
  """The sweep and the randomized search, their results in
  `output_dir/results.json`, under a `training_loops.RunLock` on it; bad
  settings are refused (`run_config.SettingsError`) before anything is
  written.

  Raises:
    run_config.SettingsError, and what `experiment.run` raises.
  """
  if config.lr_schedule == "piecewise":
    raise run_config.SettingsError(
        "--lr_schedule=piecewise sets the learning rates itself "
        "(--lr_values), which hparam_search tunes; accepted here: "
        "constant, exponential, cosine.")
  if config.strategy == "multi_worker":
    # Its cross-validated search trains outside any strategy, and every
    # worker would write the search's files.
    raise run_config.SettingsError(
        "hparam_search runs in one process: --strategy=multi_worker is "
        "not accepted here (default, one_device or mirrored are).")
  experiment.RunPlan.checked(regress.build(config), config, strategy,
                             (config.loop,))
  with training_loops.RunLock(output_dir):
    experiment.claim_output_dir(output_dir, "hparam_search", config)
    sweep = learning_rate_sweep(config, output_dir, strategy)
    found = randomized_search(config, output_dir)
    best = min(sweep, key=lambda row: row["val_loss"])
    results = {"experiment": "hparam_search", "flags": config.as_dict(),
               "seed": config.seed, "versions": experiment.versions(),
               "learning_rate_sweep": sweep, "best_learning_rate": best,
               "random_search": found}
    training_loops.write_json_atomically(
        os.path.join(output_dir, "results.json"), results, indent=2)
  print("learning-rate sweep (final val MSE):")
  for row in sweep:
    print(f"  {row['learning_rate']:.1e}  {row['val_loss']:.4f}")
  print(f"random search: best {found['best_params']}, CV MSE "
        f"{found['best_cv_mse']:.4f}, test MSE {found['test_mse']:.4f}")


# Its results.json is written once, at the end.
main = experiment.main_running(_sweep_and_search_run, partial_results=None)

if __name__ == "__main__":
  run_config.run_cli(Config, main)
