"""The research-run controls through the scripts: each flag reaches
the run (against a run built by hand with Keras' own optimizer, or a closed
form), the dev-run modes, determinism, the reports every run writes, and a
one-line refusal for every bad value, with nothing written."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

from absl import flags
import keras
import numpy as np
import pytest
import sklearn.metrics
import tensorflow as tf

import training_loops
from conftest import REPO
from layer_harness import global_dtype_policy
from research.experiments import classify, hparam_search, regress
from research.framework import datasets, experiment, run_config
from research.tools import compare


# digits: 1437 training examples, so 45 batches of 32 an epoch.
STEPS_PER_EPOCH = 45


def _run_classify(output_dir, **flag_values):
  flag_values = {"loop": "graph", "epochs": 1, "verbose": 0,
                 "output_dir": str(output_dir), **flag_values}
  classify.main(classify.Config.resolved(**flag_values))
  with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as f:
    return json.load(f)


def _by_hand(optimizer_fn, epochs=1, precision="float32"):
  # `global_dtype_policy` is the tests' own, not the code under test.
  """The graph loop on classify's experiment with its default flags, the
  optimizer built by hand: the reference a flag's run must equal."""
  config = classify.Config.resolved(loop="graph", epochs=epochs, verbose=0)
  built = classify.build(config)
  keras.utils.set_random_seed(config.seed)
  data = experiment.make_dataset(built, "train", 32, config.seed)
  with global_dtype_policy(precision):
    return training_loops.train(
        built.model_fn, optimizer_fn, built.loss, data, loop="graph",
        epochs=epochs, metrics=built.metrics, seed=config.seed,
        verbose=0)


@pytest.mark.parametrize("flag_values,optimizer_fn", [
    (dict(optimizer="adam", learning_rate=1e-3),
     lambda: keras.optimizers.Adam(1e-3)),
    (dict(optimizer="nesterov", momentum=0.8, weight_decay=1e-3),
     lambda: keras.optimizers.SGD(0.01, momentum=0.8, nesterov=True,
                                  weight_decay=1e-3)),
    (dict(optimizer="rmsprop", learning_rate=1e-3, clipnorm=0.5),
     lambda: keras.optimizers.RMSprop(1e-3, global_clipnorm=0.5)),
    (dict(optimizer="adamw", learning_rate=1e-3, weight_decay=0.01,
          ema_momentum=0.9),
     lambda: keras.optimizers.AdamW(1e-3, weight_decay=0.01, use_ema=True,
                                    ema_momentum=0.9)),
    (dict(optimizer="momentum", gradient_accumulation_steps=3),
     lambda: keras.optimizers.SGD(0.01, momentum=0.9,
                                  gradient_accumulation_steps=3)),
    (dict(optimizer="adagrad", lr_schedule="exponential", decay_steps=10,
          decay_rate=0.5),
     lambda: keras.optimizers.Adagrad(
         keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.5))),
])
def test_optimizer_flags_train_as_keras_own_optimizer(tmp_path, flag_values,
                                                      optimizer_fn):
  results = _run_classify(tmp_path, **flag_values)
  for key, value in flag_values.items():
    assert results["flags"][key] == value
  reference = _by_hand(optimizer_fn)
  history = results["loops"]["graph"]["history"]
  np.testing.assert_allclose(history["loss"], reference.history["loss"],
                             rtol=1e-5)
  np.testing.assert_allclose(history["learning_rate"],
                             reference.history["learning_rate"], rtol=1e-6)


def test_cosine_schedule_with_warm_up_logs_its_closed_form(tmp_path):
  """Linear warm-up from 0 over 30 steps, then cosine to 0 over
  decay_steps=100: the learning rate at each epoch's end (steps 45, 90,
  135)."""
  results = _run_classify(tmp_path, epochs=3, lr_schedule="cosine",
                          warmup_steps=30, decay_steps=100,
                          learning_rate=0.05)
  expected = [0.05 * 0.5 * (1 + math.cos(math.pi * min(step - 30, 100)
                                         / 100))
              for step in (45, 90, 135)]
  np.testing.assert_allclose(
      results["loops"]["graph"]["history"]["learning_rate"], expected,
      rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_as_a_model_built_under_the_policy(
    tmp_path, precision):
  results = _run_classify(tmp_path, precision=precision)
  variables = [name for name, _ in tf.train.list_variables(
      str(tmp_path / "checkpoints" / "graph"))]
  # Loss scaling only for float16, as fit's auto_scale_loss.
  assert any("dynamic_scale" in name for name in variables) == (
      precision == "mixed_float16")
  reference = _by_hand(lambda: keras.optimizers.SGD(0.01),
                       precision=precision)
  assert reference.model.layers[-2].compute_dtype == precision[6:]
  assert reference.model.layers[-1].compute_dtype == "float32"  # output
  losses = results["loops"]["graph"]["history"]["loss"]
  np.testing.assert_allclose(losses, reference.history["loss"], rtol=1e-5)
  # ... and the policy shows: float32 gives another loss.
  float32 = _by_hand(lambda: keras.optimizers.SGD(0.01)).history["loss"]
  assert not np.allclose(losses, float32, rtol=1e-5)
  assert keras.mixed_precision.global_policy().name == "float32"  # restored


def test_eval_every_steps_logs_validation_by_step(tmp_path):
  results = _run_classify(tmp_path, epochs=2, eval_every_steps=20)
  steps = results["loops"]["graph"]["step_history"]
  assert steps["step"] == [20, 40, 60, 80]
  assert steps["epoch"] == [0, 0, 1, 1]
  assert all(np.isfinite(steps["val_loss"]))


def test_checkpoint_every_steps_saves_inside_epochs(tmp_path):
  """45 steps: saves at steps 20, 40 and the epoch's end; checkpoints are
  numbered by save."""
  _run_classify(tmp_path, checkpoint_every_steps=20)
  checkpoints = tmp_path / "checkpoints" / "graph"
  assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-3")


def test_checkpoint_every_steps_with_model_fit_alone_is_refused(tmp_path):
  with pytest.raises(SystemExit, match="--checkpoint_every_steps needs a "
                     r"loop that resumes inside an epoch \(eager, function, "
                     r"graph\), not --loop=keras_fit"):
    _run_classify(tmp_path / "run", loop="keras_fit",
                  checkpoint_every_steps=5)
  assert not (tmp_path / "run").exists()


def test_fast_dev_run_runs_every_loop_on_one_batch_and_keeps_nothing(
    tmp_path, capsys, monkeypatch):
  """Every loop, with the cadence flags (due at the one step, so at the
  epoch's end) and an export too, in seconds; the results are those of one
  batch of each split, and no directory stays."""
  returned = []
  monkeypatch.setattr(experiment, "_run_loops", _recording(
      experiment._run_loops, returned))
  output_dir = tmp_path / "run"
  classify.main(
      classify.Config.resolved(
          loop="all",
          epochs=20,
          verbose=0,
          fast_dev_run=True,
          output_dir=str(output_dir),
          export_dir=str(tmp_path / "export"),
          eval_every_steps=1,
          checkpoint_every_steps=1))
  printed = capsys.readouterr().out
  assert "nothing was kept" in printed
  assert not output_dir.exists() and not (tmp_path / "export").exists()
  results, = returned
  assert list(results["loops"]) == list(training_loops.LOOPS)
  assert results["steps_per_epoch"] == 1
  for report in results["loops"].values():
    assert report["epochs"] == [0]
    assert sum(map(sum, report["confusion_matrix"])) == 32  # one batch


def _recording(function, returned):
  def record(*args, **kwargs):
    returned.append(function(*args, **kwargs))
    return returned[-1]
  return record


def test_limit_batches_cuts_every_split(tmp_path):
  results = _run_classify(tmp_path, limit_batches=3, epochs=2)
  assert results["steps_per_epoch"] == 3
  saved = tf.train.load_checkpoint(str(tmp_path / "checkpoints" / "graph"))
  assert int(saved.get_tensor("steps_done/.ATTRIBUTES/VARIABLE_VALUE")) == 6
  matrix = results["loops"]["graph"]["confusion_matrix"]
  assert sum(map(sum, matrix)) == 3 * 32


def test_overfit_batches_drives_the_training_loss_to_about_zero(tmp_path):
  results = _run_classify(tmp_path, overfit_batches=2, epochs=40,
                          optimizer="adam", learning_rate=3e-3)
  losses = results["loops"]["graph"]["history"]["loss"]
  assert results["steps_per_epoch"] == 2
  assert losses[-1] < 0.01 < losses[0]


def test_deterministic_runs_are_bitwise_identical(tmp_path):
  """Fresh processes, side by side: op determinism is process-wide (and
  the test session turns it on for itself). On this CPU the graph loop's
  ops may be deterministic anyway; what can fail here is the flag reaching
  TensorFlow and results.json."""
  processes = {name: subprocess.Popen(
      [sys.executable, "-m", "research", "classify", "--loop=graph",
       "--epochs=2", "--verbose=0", "--deterministic",
       f"--output_dir={tmp_path / name}"], cwd=REPO,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for name in ("first", "second")}
  histories = []
  for name, process in processes.items():
    assert process.wait(timeout=300) == 0
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert results["op_determinism"] and results["flags"]["deterministic"]
    histories.append(results["loops"]["graph"]["history"])
  assert histories[0] == histories[1]  # bitwise: JSON floats round-trip


def test_every_run_reports_its_model_confusion_matrix_and_hparams(tmp_path):
  export_dir = tmp_path / "export"
  results = _run_classify(tmp_path / "run", export_dir=str(export_dir))
  model = keras.models.load_model(export_dir / "graph.keras")
  summary = results["model"]
  assert summary["trainable_parameters"] + summary[
      "non_trainable_parameters"] == model.count_params()
  assert [row["type"] for row in summary["layers"]][-1] == "Dense"
  assert summary["layers"][-1]["output_shape"] == [None, 10]
  # The confusion matrix against scikit-learn on the exported model.
  config = classify.Config.resolved()
  splits = datasets.load_for("classification", config)
  predicted = model.predict(splits.x_test, verbose=0).argmax(axis=-1)
  np.testing.assert_array_equal(
      results["loops"]["graph"]["confusion_matrix"],
      sklearn.metrics.confusion_matrix(splits.y_test, predicted,
                                       labels=range(10)))
  assert (tmp_path / "run" / "confusion_matrix_graph.png").stat().st_size
  hparams_dir = tmp_path / "run" / "hparams" / "graph"
  tags = {value.tag for name in os.listdir(hparams_dir)
          for event in tf.compat.v1.train.summary_iterator(
              str(hparams_dir / name))
          for value in event.summary.value}
  assert {"_hparams_/session_start_info", "val_loss",
          "test_accuracy"} <= tags


def test_regression_runs_have_no_confusion_matrix(tmp_path):
  regress.main(
      regress.Config.resolved(
          loop="graph",
          epochs=1,
          verbose=0,
          output_dir=str(tmp_path),
          optimizer="adam"))
  results = json.loads((tmp_path / "results.json").read_text())
  assert "confusion_matrix" not in results["loops"]["graph"]
  assert results["model"]["trainable_parameters"] > 0
  assert not list(tmp_path.glob("confusion_matrix_*.png"))


def test_compare_trace_uses_the_flags_optimizer(capsys, monkeypatch):
  traced = []
  lockstep = training_loops.compare

  def recording(**arguments):
    traced.append(arguments["optimizer_fn"]())
    return lockstep(**arguments)
  monkeypatch.setattr(training_loops, "compare", recording)
  compare.compare("classify", classify.Config.resolved(
      loop="graph", optimizer="adam", learning_rate=1e-3, beta_1=0.8),
                  trace_loops=True, trace_steps=3)
  (optimizer,) = traced
  assert type(optimizer) is keras.optimizers.Adam
  assert (float(optimizer.learning_rate), optimizer.beta_1) == (
      pytest.approx(1e-3), 0.8)
  assert "agree over 3 steps" in capsys.readouterr().out


def test_hparam_search_refuses_a_schedule_that_ignores_the_learning_rate(
    tmp_path):
  with pytest.raises(SystemExit, match="--lr_schedule=piecewise sets the "
                                       "learning rates itself"):
    hparam_search.main(
        hparam_search.Config.resolved(
            loop="graph",
            verbose=0,
            lr_schedule="piecewise",
            lr_boundaries=[10],
            lr_values=[0.1, 0.01],
            output_dir=str(tmp_path / "run")))
  assert not (tmp_path / "run").exists()


def test_hparam_search_refuses_multi_worker(tmp_path):
  # The check itself, under the default strategy: a real multi-worker one
  # needs a cluster (TF_CONFIG), and its search trains outside it anyway.
  config = hparam_search.Config.resolved(loop="graph", verbose=0)
  with pytest.raises(run_config.SettingsError,
                     match="^hparam_search runs in one process: "
                           "--strategy=multi_worker"):
    hparam_search.sweep_and_search(
        dataclasses.replace(config, strategy="multi_worker"),
                                   tf.distribute.get_strategy(),
                                   str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_hparam_search_fast_dev_run_keeps_nothing(tmp_path, capsys):
  hparam_search.main(
      hparam_search.Config.resolved(
          loop="graph",
          verbose=0,
          fast_dev_run=True,
          output_dir=str(tmp_path / "run"),
          optimizer="adam"))
  assert not (tmp_path / "run").exists()
  assert "nothing was kept" in capsys.readouterr().out


@pytest.mark.parametrize("flag_values,message", [
    (dict(warmup_steps=100), "--warmup_steps=100 does not end before the "
                             "run's 45 steps"),
    (dict(overfit_batches=46), "--overfit_batches=46 is more than the 45 "
                               "training batches"),
    (dict(momentum=0.5), "--momentum"),
    (dict(optimizer="momentum", momentum=1.5), "--momentum"),
    (dict(lr_schedule="piecewise"), "--lr_boundaries"),
    (dict(lr_schedule="piecewise", lr_boundaries=[10],
          lr_values=[0.1]), "--lr_values"),
    (dict(lr_boundaries=[10]), "--lr_boundaries"),
    (dict(weight_decay=-1.0), "--weight_decay"),
    (dict(clipnorm=0.0), "--clipnorm"),
    (dict(ema_momentum=1.0), "--ema_momentum"),
    (dict(decay_rate=0.0, lr_schedule="exponential"), "--decay_rate"),
    (dict(limit_batches=2, overfit_batches=2),
     "--limit_batches and --overfit_batches"),
])
def test_bad_values_are_refused_with_one_line_and_nothing_written(
    tmp_path, flag_values, message):
  """Refused by the config (a value out of its field's range) or by the
  run's checks (values that conflict): one line either way."""
  output_dir = tmp_path / "run"
  with pytest.raises((SystemExit, run_config.SettingsError)) as refused:
    _run_classify(output_dir, **flag_values)
  error = (str(refused.value.code) if refused.type is SystemExit
           else f"error: {refused.value}")
  assert error.startswith("error: ") and message in error
  assert "\n" not in error
  assert not output_dir.exists()


@pytest.mark.parametrize("argument,message", [
    ("--optimizer=lion", "flag --optimizer=lion: value should be one of "
                         "<sgd|momentum|nesterov|adam|adamw|rmsprop|adagrad>"),
    ("--lr_schedule=linear", "flag --lr_schedule=linear: value should be"),
    ("--precision=float16", "flag --precision=float16: value should be"),
    ("--eval_every_steps=0", "--eval_every_steps=0 is out of range; "
                             "accepted: >= 1."),
    ("--lr_boundaries=10,x", "--lr_boundaries=10,x holds an item that is "
                             "not an integer; accepted: e.g. 1000,2000."),
    ("--checkpoint_every_steps=-1", "--checkpoint_every_steps=-1"),
    ("--limit_batches=0", "--limit_batches=0"),
    ("--overfit_batches=0", "--overfit_batches=0"),
    ("--gradient_accumulation_steps=0", "--gradient_accumulation_steps=0"),
    ("--warmup_steps=-1", "--warmup_steps=-1"),
    ("--decay_steps=0", "--decay_steps=0"),
])
def test_unknown_and_non_positive_values_fail_at_parsing(argument, message):
  """The command line's flags: absl refuses a value outside an enum's
  choices as it parses; the config, a number outside its field's range.
  Either is one line before main runs
  (`test_research.py::test_scripts_exit_with_a_clear_line`)."""
  flag_values = flags.FlagValues()
  classify.Config.define_flags(flag_values)
  with pytest.raises((flags.IllegalFlagValueError, run_config.SettingsError),
                     match=re.escape(message)):
    flag_values(["classify", argument])
    classify.Config.from_flags(flag_values)


def test_helpfull_describes_every_control():
  """What --helpfull prints for the shared settings."""
  flag_values = flags.FlagValues()
  classify.Config.define_flags(flag_values)
  described = flag_values.module_help(run_config.__name__)
  for name in ("optimizer", "momentum", "weight_decay", "lr_schedule",
               "warmup_steps", "decay_steps", "decay_rate", "lr_boundaries",
               "lr_values", "precision", "clipnorm", "ema_momentum",
               "gradient_accumulation_steps", "eval_every_steps",
               "checkpoint_every_steps", "fast_dev_run", "limit_batches",
               "overfit_batches", "deterministic"):
    assert f"--{name}:" in described or f"--[no]{name}:" in described, name


def test_a_cosine_schedule_spanning_the_run_fixes_its_epochs(tmp_path):
  """Its decay length is the run's: more epochs on a rerun would change the
  schedule the first ones trained with."""
  _run_classify(tmp_path, lr_schedule="cosine")
  with pytest.raises(SystemExit, match="epochs: 1 then, 2 now"):
    _run_classify(tmp_path, lr_schedule="cosine", epochs=2)
  _run_classify(tmp_path / "fixed", lr_schedule="cosine", decay_steps=90)
  _run_classify(tmp_path / "fixed", lr_schedule="cosine", decay_steps=90,
                epochs=2)  # a fixed decay length: more epochs continue
