"""One config per experiment: run_config.json records every flag a script
defines, and a rerun into the same output dir that changes one is refused
with one line naming it."""

import json

from absl import flags
from absl.testing import flagsaver
import pytest

import training_loops
from research.experiments import (classify, deep_net, early_stopping,
                                  hparam_search, regress, wide_deep)
from research.framework import common_flags
from research.tools import compare

flags.FLAGS.mark_as_parsed()


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
           "seed", "strategy", "cpu_replicas", "data_dir",
           # issue 14's research-run controls, with the names it asks for
           "optimizer", "momentum", "weight_decay", "lr_schedule",
           "warmup_steps", "decay_steps", "decay_rate", "lr_boundaries",
           "lr_values", "precision", "clipnorm", "ema_momentum",
           "gradient_accumulation_steps", "eval_every_steps",
           "checkpoint_every_steps", "fast_dev_run", "limit_batches",
           "overfit_batches", "deterministic"}


@pytest.mark.parametrize("script,own", [
    (classify, {"normalize", "dropout_rate"}), (early_stopping, {"patience"}),
    (regress, set()),
    (deep_net, {"activation", "batchnorm", "dropout", "gradient_batches"}),
    (wide_deep, {"wide_deep_variant", "aux_output"}),
    (hparam_search, {"sweep_points", "search_iterations", "cv_folds"}),
    # compare: its own and classify's
    (compare, {"experiment", "normalize", "dropout_rate"})])
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
    (early_stopping, "patience", 5, 3, {}),
    (hparam_search, "sweep_points", 2, 3, {}),
    (hparam_search, "search_iterations", 2, 3, {}),
    (hparam_search, "cv_folds", 2, 3, {}),
    (compare, "experiment", "classify", "early_stopping", {})])
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


def test_a_flag_an_older_run_did_not_record_is_named_as_such(tmp_path,
                                                             no_training):
  with pytest.raises(_TrainingStarted):
    _run_until_training(classify, output_dir=str(tmp_path))
  path = tmp_path / "run_config.json"
  older = json.loads(path.read_text())
  del older["normalize"]
  path.write_text(json.dumps(older))
  with pytest.raises(SystemExit, match="normalize: not recorded then, "
                                       "'zscore' now"):
    _run_until_training(classify, output_dir=str(tmp_path))


def test_mnist_gets_classifys_recipe_for_the_flags_not_given():
  with flagsaver.flagsaver(dataset="mnist"):
    config = common_flags.resolved(classify.DEFAULTS, classify.__name__)
  assert {name: config[name] for name in classify.MNIST_RECIPE} == (
      classify.MNIST_RECIPE)
  # A flag given wins, even at its own default; the rest of the recipe
  # stays.
  with flagsaver.flagsaver(dataset="fashion_mnist", normalize="zscore",
                           epochs=3):
    config = common_flags.resolved(classify.DEFAULTS, classify.__name__)
  assert (config["normalize"], config["epochs"], config["optimizer"],
          config["dropout_rate"]) == ("zscore", 3, "adamw", 0.2)
  # As research.tools.report asks for it: the same, without the command line.
  assert common_flags.resolved(
      classify.DEFAULTS, classify.__name__,
      given={"dataset": "fashion_mnist", "normalize": "zscore",
             "epochs": 3}) == config
  with flagsaver.flagsaver(dataset="digits"):
    config = common_flags.resolved(classify.DEFAULTS, classify.__name__)
  assert (config["normalize"], config["optimizer"], config["learning_rate"],
          config["lr_schedule"], config["dropout_rate"]) == (
              "zscore", "sgd", 0.01, "constant", 0.0)


def test_california_gets_hparam_searchs_recipe():
  with flagsaver.flagsaver(dataset="california_housing", epochs=5):
    config = common_flags.resolved(hparam_search.DEFAULTS,
                                   hparam_search.__name__)
  assert (config["optimizer"], config["lr_schedule"], config["epochs"],
          config["search_iterations"]) == ("adam", "cosine", 5, 12)
  with flagsaver.flagsaver(dataset="diabetes"):
    config = common_flags.resolved(hparam_search.DEFAULTS,
                                   hparam_search.__name__)
  assert (config["optimizer"], config["epochs"],
          config["search_iterations"]) == ("sgd", 20, 6)
