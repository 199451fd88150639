"""research.experiments.distill: Keras' Distiller in our loops against plain
student training, and the script end to end on tiny settings."""

import functools
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import training_loops
from conftest import fast_dev_run_keeps_nothing
from research.experiments import distill
from research.framework import run_config
from research.tools import compare

def _config(**given):
  return distill.Config.resolved(
      **{"dataset": "digits", "teacher_units": 16, "student_units": 12,
         **given})


def _adam():
  return keras.optimizers.Adam(1e-3)


@pytest.mark.parametrize("loop", ["eager", "graph"])
def test_only_the_labels_weigh_the_distilled_student_as_plain_training(
    tmp_path, loop):
  config = _config(student_loss_weight=1.0)
  splits = distill.image_splits(config)
  teacher_path = str(tmp_path / "teacher.keras")
  distill.net(splits, config, "teacher").save(teacher_path)
  student = distill.build(config, splits, "student")
  distilled = distill.build(config, splits, "distilled", teacher_path)

  def data():
    return tf.data.Dataset.from_tensor_slices(
        (splits.x_train[:256], splits.y_train[:256])).batch(32)
  alone = training_loops.train(student.model_fn, _adam, student.loss, data(),
                               loop=loop, epochs=2, seed=3, verbose=0)
  taught = training_loops.train(
      functools.partial(distilled.model_fn, _adam), train_data=data(),
      loop=loop, epochs=2, seed=3, verbose=0)
  for got, expected in zip(taught.model.student.get_weights(),
                           alone.model.get_weights(), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(taught.history["loss"], alone.history["loss"],
                             rtol=1e-5)


def test_the_soft_targets_term_is_the_temperature_squared_kl_divergence(
    tmp_path):
  config = _config(student_loss_weight=0.0, temperature=4.0)
  splits = distill.image_splits(config)
  teacher_path = str(tmp_path / "teacher.keras")
  distill.net(splits, config, "teacher").save(teacher_path)
  model = distill.build(config, splits, "distilled",
                        teacher_path).model_fn(_adam)
  images = splits.x_train[:32]
  loss = float(model.compute_loss(images, splits.y_train[:32],
                                  training=False))

  def softened(logits):
    scaled = np.asarray(logits, "float64") / 4.0
    exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)
  teacher = softened(model.teacher(images, training=False))
  student = softened(model.student(images, training=False))
  expected = 16.0 * np.mean(np.sum(teacher * np.log(teacher / student),
                                   axis=1))
  assert expected > 0
  assert loss == pytest.approx(expected, rel=1e-4)


def _results(output_dir):
  with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as f:
    return json.load(f)


def test_the_script_reports_three_error_counts_per_loop(tmp_path, capsys):
  distill.main(
      distill.Config.resolved(
          dataset="digits",
          epochs=2,
          teacher_epochs=3,
          limit_batches=4,
          loop="all",
          teacher_units=32,
          student_units=16,
          verbose=0,
          output_dir=str(tmp_path)))
  results = _results(tmp_path)
  printed = capsys.readouterr().out
  assert "distill on digits: test errors out of 128" in printed
  fit = results["loops"]["keras_fit"]["test"]
  for loop, report in results["loops"].items():
    test = report["test"]
    assert set(test) == {"teacher_errors", "student_alone_errors",
                         "student_distilled_errors", "gap_recovered"}
    assert 0 <= test["student_distilled_errors"] <= 128
    # Every loop trains Keras' Distiller as fit does.
    assert test["student_distilled_errors"] == fit["student_distilled_errors"]
    assert test["student_alone_errors"] == fit["student_alone_errors"]
  for role in distill.ROLES:
    assert os.path.isfile(tmp_path / role / "results.json")
  assert os.path.isfile(tmp_path / "teacher" / "export" / "graph.keras")
  teacher = _results(tmp_path / "teacher")
  assert list(teacher["loops"]) == ["graph"]
  assert len(teacher["loops"]["graph"]["history"]["loss"]) == 3


@pytest.mark.parametrize("settings,message", [
    (dict(temperature=0.0), "--temperature=0.0 is out of range; accepted: "
                            "> 0."),
    (dict(temperature=-1.0), "--temperature=-1.0 is out of range"),
    (dict(student_loss_weight=1.5), "--student_loss_weight=1.5 is out of "
                                    "range; accepted: >= 0 and <= 1."),
    (dict(dataset="diabetes"), "--dataset=diabetes is not an image dataset"),
    (dict(dataset="mnist", data_dir=os.path.dirname(__file__)),
     "has no mnist IDX files"),
])
def test_bad_settings_are_one_line_before_anything_is_written(
    tmp_path, settings, message):
  # Refused by the config (a value out of range) or the run's checks.
  with pytest.raises((SystemExit, run_config.SettingsError)) as exit_:
    distill.main(
        distill.Config.resolved(
            **{"dataset": "digits", **settings},
            output_dir=str(tmp_path / "run")))
  assert message in str(exit_.value) and "\n" not in str(exit_.value)
  assert not os.path.exists(tmp_path / "run")


def test_compare_traces_the_distilled_students_step(capsys):
  settings = {"dataset": "digits", "teacher_units": 32, "student_units": 16}
  # What the trace trains: the Distiller's step, under an untrained teacher.
  traced = distill.build(_config(**settings)).model_fn(_adam)
  assert isinstance(traced, keras.distillation.Distiller)
  compare.compare(
      "distill",
      compare.EXPERIMENTS["distill"].Config.resolved(**settings),
      trace_loops=True,
      trace_steps=2)
  assert ("eager, function, graph and keras_fit agree over 2 steps"
          in capsys.readouterr().out)


def test_fast_dev_run_trains_every_role_and_loop_and_keeps_nothing(
    tmp_path, capsys):
  fast_dev_run_keeps_nothing(distill, tmp_path / "run", capsys,
                             dataset="digits", teacher_units=16,
                             student_units=12)
