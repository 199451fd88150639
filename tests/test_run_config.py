"""One typed config per experiment: its fields, types, defaults and
recipes; the flags generated from it and parsed into it; run_config.json
its serialization, and a rerun into the same output dir that changes a
field refused with one line naming it."""

import dataclasses
import json
import os
import subprocess
import sys
from typing import ClassVar

from absl import flags
import pytest

import losses
import training_loops
from conftest import REPO
from research import EXPERIMENTS
from research.experiments import (classify, deep_net, early_stopping, gan,
                                  hparam_search, regress, wide_deep)
from research.framework import datasets, experiment, models, run_config
from research.tools import soak


def test_rerun_refuses_an_output_dir_with_other_flags(tmp_path):
  regress.main(
      regress.Config.resolved(
          loop="graph", epochs=1, verbose=0, output_dir=str(tmp_path)))
  with pytest.raises(SystemExit, match="seed: 42 then, 7 now"):
    regress.main(
        regress.Config.resolved(
            loop="graph",
            epochs=1,
            verbose=0,
            seed=7,
            output_dir=str(tmp_path)))


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
  script.main(
      script.Config.resolved(loop="graph", epochs=1, verbose=0, **flag_values))


# What run_config.json records besides a script's own flags: the shared
# flags a rerun may not change.
_SHARED = {"experiment", "dataset", "loop", "batch_size", "learning_rate",
           "seed", "strategy", "cpu_replicas", "data_dir", "optimizer",
           "momentum", "beta_1", "beta_2", "weight_decay", "lr_schedule",
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
    (hparam_search, {"sweep_points", "search_iterations", "cv_folds"})])
def test_run_config_records_the_experiments_own_fields(tmp_path, no_training,
                                                       script, own):
  with pytest.raises(_TrainingStarted):
    _run_until_training(script, output_dir=str(tmp_path))
  recorded = json.loads((tmp_path / "run_config.json").read_text())
  assert set(recorded) == _SHARED | own
  config = script.Config.resolved(loop="graph", epochs=1, verbose=0,
                                  output_dir=str(tmp_path))
  # The config's serialization, less what a rerun may change.
  assert recorded == {"experiment": recorded["experiment"], **{
      name: value for name, value in config.as_dict().items()
      if name not in ("epochs", "verbose", "output_dir", "export_dir")}}


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
    (hparam_search, "cv_folds", 2, 3, {})])
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


def test_rerun_refuses_another_experiment_in_the_same_directory(
    tmp_path, no_training):
  with pytest.raises(_TrainingStarted):
    _run_until_training(classify, output_dir=str(tmp_path))
  with pytest.raises(SystemExit, match="experiment: 'classify' then, "
                                       "'early_stopping' now"):
    _run_until_training(early_stopping, output_dir=str(tmp_path))


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


def test_mnist_gets_classifys_recipe_for_the_fields_not_given():
  config = classify.Config.resolved(dataset="mnist")
  assert {name: getattr(config, name)
          for name in classify.MNIST_RECIPE} == classify.MNIST_RECIPE
  # A field given wins, even at its own default; the rest of the recipe
  # stays.
  config = classify.Config.resolved(dataset="fashion_mnist",
                                    normalize="zscore", epochs=3)
  assert (config.normalize, config.epochs, config.optimizer,
          config.dropout_rate) == ("zscore", 3, "adamw", 0.2)
  config = classify.Config.resolved(dataset="digits")
  assert (config.normalize, config.optimizer, config.learning_rate,
          config.lr_schedule, config.dropout_rate) == (
              "zscore", "sgd", 0.01, "constant", 0.0)
  assert config == classify.Config()  # digits has no recipe


def test_california_gets_hparam_searchs_recipe():
  config = hparam_search.Config.resolved(dataset="california_housing",
                                         epochs=5)
  assert (config.optimizer, config.lr_schedule, config.epochs,
          config.search_iterations) == ("adam", "cosine", 5, 12)
  config = hparam_search.Config.resolved(dataset="diabetes")
  assert (config.optimizer, config.epochs,
          config.search_iterations) == ("sgd", 20, 6)


@dataclasses.dataclass(frozen=True)
class _TwoRecipes(run_config.Settings):
  kind: str = run_config.setting("a", "Kind.", choices=("a", "b"))
  size: str = run_config.setting("s", "Size.", choices=("s", "l"))
  rate: float = run_config.setting(1.0, "Rate.", above=0)
  steps: int = run_config.setting(1, "Steps.", at_least=1)

  RECIPES: ClassVar[dict] = {"kind": {"b": {"rate": 2.0, "steps": 5}},
                             "size": {"l": {"rate": 3.0}}}


def test_recipes_apply_in_order_under_the_fields_given():
  assert _TwoRecipes.resolved(kind="b") == _TwoRecipes("b", "s", 2.0, 5)
  # The later recipe wins where both set a field; a field given wins over
  # both, even at its own default.
  assert _TwoRecipes.resolved(kind="b", size="l") == (
      _TwoRecipes("b", "l", 3.0, 5))
  assert _TwoRecipes.resolved(kind="b", size="l", rate=1.0, steps=1) == (
      _TwoRecipes("b", "l", 1.0, 1))
  assert _TwoRecipes.resolved() == _TwoRecipes()


def test_a_recipe_follows_any_field_and_applies_in_order():
  """gan's recipes: the dataset's (batch size), then the objective's."""
  config = gan.Config.resolved(objective="wgan_gp", beta_2=0.99)
  assert (config.batch_size, config.critic_steps, config.learning_rate,
          config.beta_1, config.beta_2, config.epochs) == (
              64, 5, 1e-4, 0.5, 0.99, 20)
  assert gan.Config.resolved().critic_steps == 1


def test_the_config_is_typed_frozen_and_checked():
  config = classify.Config(epochs=3, learning_rate=1)
  assert isinstance(config.learning_rate, float)  # an int is a float
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.epochs = 4
  for values, message in [
      ({"epochs": "3"}, "--epochs='3' is not an integer."),
      ({"epochs": 0}, "--epochs=0 is out of range; accepted: >= 1."),
      ({"fast_dev_run": 1}, "--fast_dev_run=1 is not true or false."),
      ({"normalize": "l2"}, "--normalize=l2 is not one of the accepted "
                            "values: none, zscore, minmax."),
      ({"dropout_rate": 1.0}, "accepted: >= 0 and < 1."),
      ({"lr_values": ["0.1"]}, "--lr_values=0.1 holds an item that is "
                               "not a number."),
      ({"loop": None}, "--loop needs a value.")]:
    with pytest.raises(run_config.SettingsError) as refused:
      classify.Config(**values)
    assert message in str(refused.value), values
  assert classify.Config(lr_boundaries=[10, 20]).lr_boundaries == (10, 20)
  with pytest.raises(run_config.SettingsError,
                     match="has no patience; accepted: dataset, loop"):
    classify.Config.resolved(patience=3)


def test_flags_are_generated_from_the_config_and_parsed_into_it():
  flag_values = flags.FlagValues()
  gan.Config.define_flags(flag_values)
  flag_values(["gan", "--objective=wgan_gp", "--lr_boundaries=10,20",
               "--nogenerator_batch_norm", "--epochs=3"])
  config = gan.Config.from_flags(flag_values)
  # The flags given, the recipes for the rest.
  assert config == gan.Config.resolved(
      objective="wgan_gp", lr_boundaries=(10, 20),
      generator_batch_norm=False, epochs=3)
  assert config.critic_steps == 5 and config.lr_boundaries == (10, 20)
  # No flag holds another experiment's field, and the same field name may
  # mean something else in another experiment: each has its own flags.
  assert "patience" not in flag_values
  assert "Recipes: --objective=gan: critic_steps=1" in (
      flag_values["critic_steps"].help)



def test_a_list_setting_with_choices_checks_each_item():
  flag_values = flags.FlagValues()
  soak.Config.define_flags(flag_values)
  flag_values(["soak", "--kill_points=results,checkpoint"])
  assert soak.Config.from_flags(flag_values).kill_points == (
      "results", "checkpoint")
  assert soak.Config().kill_points == soak.KILL_POINTS
  assert "Each one of: training, checkpoint, evaluation, results." in (
      flag_values["kill_points"].help)
  with pytest.raises(run_config.SettingsError,
                     match=r"^--kill_points=results,steps holds steps, "
                           r"not one of the accepted values: training, "
                           r"checkpoint, evaluation, results\.$"):
    soak.Config(kill_points=("results", "steps"))
  with pytest.raises(run_config.SettingsError,
                     match=r"^--kill_points needs at least one of: "):
    soak.Config(kill_points=())

def test_every_experiment_has_a_typed_config_and_a_main():
  for name in EXPERIMENTS:
    module = __import__(f"research.experiments.{name}", fromlist=[name])
    assert issubclass(module.Config, run_config.RunConfig), name
    assert dataclasses.is_dataclass(module.Config), name
    assert module.Config.__dataclass_params__.frozen, name
    assert callable(module.main), name


def _command(*arguments):
  return subprocess.run([sys.executable, *arguments], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_the_old_module_spelling_is_refused_naming_the_new_command():
  done = _command("-m", "research.callbacks", "--epochs=1")
  assert done.returncode != 0
  last = done.stderr.strip().splitlines()[-1]
  assert last.endswith("(ImportError: research.callbacks is run as "
                       "`python -m research early_stopping` now.)")
  assert "Traceback" not in done.stderr


def test_an_experiments_help_lists_its_flags_with_their_ranges():
  helped = _command("-m", "research", "regress", "--help")
  for line in ("--epochs: Epochs. Accepted: >= 1.",
               "--batch_size: Global batch size. Accepted: >= 1.",
               "--[no]fast_dev_run:"):
    assert line in helped.stdout, line


def test_python_m_research_lists_the_experiments_and_tools():
  """Running one with bad flags: test_research.py's bad invocations."""
  listed = _command("-m", "research")
  assert listed.returncode == 0
  for name in EXPERIMENTS:
    assert f"\n  {name} " in listed.stdout, name
  renamed = _command("-m", "research", "callbacks")
  assert renamed.stderr.strip().splitlines()[-1] == (
      "error: callbacks is called early_stopping now: python -m research "
      "early_stopping")
  refused = _command("-m", "research", "clasify")
  assert refused.returncode == 1
  assert refused.stderr.strip().splitlines()[-1].startswith(
      "error: no experiment or tool 'clasify'; accepted: classify,")


# BUILD.md's "Adding an experiment", followed: a config of its own with a
# field and a recipe, a build that reads only the config, main_for.
@dataclasses.dataclass(frozen=True)
class _TinyConfig(run_config.RunConfig):
  dataset: str = "digits"
  hidden_units: int = run_config.setting(8, "Units of the hidden layer.",
                                         at_least=1)

  RECIPES: ClassVar[dict] = {"dataset": {"digits": {"epochs": 1}}}


def _tiny_build(config):
  splits = datasets.load_for("classification", config)
  return experiment.Experiment(
      name="tiny", splits=splits,
      model_fn=lambda: models.mlp_classifier(
          splits.x_train, splits.num_classes, "minmax",
          hidden=(config.hidden_units,), seed=config.seed),
      loss=losses.SparseCategoricalCrossentropy(),
      metrics=[classify.accuracy()])


def test_an_experiment_added_by_the_recipe_runs_from_its_flags(tmp_path):
  flag_values = flags.FlagValues()
  _TinyConfig.define_flags(flag_values)
  assert "Units of the hidden layer." in flag_values["hidden_units"].help
  flag_values(["tiny", "--hidden_units=4", "--loop=graph", "--verbose=0",
               f"--output_dir={tmp_path}"])
  config = _TinyConfig.from_flags(flag_values)
  assert (config.hidden_units, config.epochs) == (4, 1)  # the recipe's
  main = experiment.main_for(_tiny_build)
  main(config)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["flags"] == config.as_dict()
  # The flag reached the model: 64 pixels into 4 units, 4 into 10 classes.
  dense = [layer["parameters"] for layer in results["model"]["layers"]
           if layer["type"] == "Dense"]
  assert dense == [64 * 4 + 4, 4 * 10 + 10]
  with pytest.raises(SystemExit, match="hidden_units: 4 then, 5 now"):
    main(dataclasses.replace(config, hidden_units=5))
