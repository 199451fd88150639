"""Knowledge distillation (Hinton et al., 2015) on MNIST.

Hinton, Vinyals & Dean (2015), Distilling the Knowledge in a Neural
Network, section 3, on MNIST: a teacher of two hidden layers of 1200
(dropout, inputs jittered by up to 2 pixels), a student of two hidden
layers of 800 trained alone, and the same student trained on the teacher's
soft targets at temperature 20 beside the labels.

    python -m research distill --data_dir=../shared/data/mnist --loop=all

The teacher is trained once, by the graph loop, into <output_dir>/teacher;
the student alone and the distilled student are trained by every loop
selected, into <output_dir>/student and <output_dir>/distilled (each a
run directory of its own, resumed by a rerun). Distillation is Keras' own
`keras.distillation.Distiller`: its `compute_loss` is the step the loops
run, so the comparison with model.fit tests our loops on Keras' code, not
on a step of ours. Reports per loop the three test errors out of the test
set and the share of the student's gap to the teacher that distillation
recovers.
"""

import contextlib
import dataclasses
import os
import tempfile
from typing import ClassVar

import keras
import numpy as np

import losses
import training_loops
from research.framework import datasets, experiment, models, run_config

# The teacher's regularization, the paper's: dropout on the hidden layers
# and (less) on the inputs, and jittered inputs.
TEACHER_DROPOUT, TEACHER_INPUT_DROPOUT, JITTER_PIXELS = 0.5, 0.2, 2

MNIST_RECIPE = {"batch_size": 128, "epochs": 30, "teacher_epochs": 80,
                "lr_schedule": "cosine"}


@dataclasses.dataclass(frozen=True)
class Config(run_config.RunConfig):
  dataset: str = "mnist"
  learning_rate: float = 1e-3
  optimizer: str = "adam"
  temperature: float = run_config.setting(
      20.0, "The softmax temperature of the soft targets.", above=0)
  student_loss_weight: float = run_config.setting(
      0.1, "The labels' share of the distilled student's loss; the rest is "
      "the soft targets' (Keras' LogitsDistillation: the KL divergence, "
      "times the temperature squared).", at_least=0, at_most=1)
  teacher_units: int = run_config.setting(
      1200, "Units of each of the teacher's two hidden layers.", at_least=1)
  student_units: int = run_config.setting(
      800, "Units of each of the student's two hidden layers.", at_least=1)
  teacher_epochs: int | None = run_config.setting(
      None, "The teacher's epochs; default: --epochs.", at_least=1)

  RECIPES: ClassVar[dict] = {
      "dataset": {"mnist": MNIST_RECIPE, "fashion_mnist": MNIST_RECIPE}}


ROLES = ("teacher", "student", "distilled")


def check(config):
  """One line for the flags the run cannot take, before anything runs."""
  datasets.check_images(config.dataset)


def image_splits(config):
  """The dataset with 2-D images (scikit-learn's digits come flat)."""
  splits = datasets.load(config.dataset, config.data_dir,
                         config.seed)
  if splits.x_train.ndim == 2:
    side = int(np.sqrt(splits.x_train.shape[1]))
    for split in ("train", "val", "test"):
      x = getattr(splits, f"x_{split}")
      setattr(splits, f"x_{split}", x.reshape(len(x), side, side))
  return splits


def _loss():
  return losses.SparseCategoricalCrossentropy(from_logits=True)


def _accuracy():
  return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


def test_errors(model, test_data):
  """`{"errors", "images"}`: how many of the test images `model` (logits)
  misclassifies, and how many it saw."""
  errors = images_seen = 0
  for images, labels in test_data:
    predicted = np.argmax(model.predict_on_batch(images), axis=-1)
    errors += int(np.sum(predicted != np.asarray(labels)))
    images_seen += len(predicted)
  return {"errors": errors, "images": images_seen}


def net(splits, config, role):
  """The teacher's or the student's network, freshly initialized."""
  scale = max(float(splits.x_train.max()), 1.0)
  shape, classes = splits.x_train.shape[1:], splits.num_classes
  if role == "teacher":
    return models.logits_mlp(
        shape, classes, [config.teacher_units] * 2, scale,
        TEACHER_INPUT_DROPOUT, TEACHER_DROPOUT, JITTER_PIXELS,
        seed=config.seed, name="teacher")
  return models.logits_mlp(shape, classes, [config.student_units] * 2,
                           scale, seed=config.seed, name="student")


def build(config, splits=None, role="distilled", teacher_path=None):
  """The experiment of one of `ROLES` on `splits` (`image_splits`, read
  when None): the teacher or the student alone (the supervised step), or
  the student distilled (Keras' `Distiller`) from the teacher saved at
  `teacher_path`, or from an untrained one when None: the same step, which
  is what `research.tools.compare --trace` follows through the loops."""
  check(config)
  if splits is None:
    splits = image_splits(config)
  if role != "distilled":
    return experiment.Experiment(
        name=f"distill_{role}", splits=splits,
        model_fn=lambda: net(splits, config, role), loss=_loss(),
        metrics=[_accuracy()], evaluate=test_errors)

  def model_fn(optimizer_fn):
    # The student first: built from the same seed state as the student
    # alone, it starts from the same weights.
    student = net(splits, config, "student")
    teacher = (keras.saving.load_model(teacher_path) if teacher_path
               else net(splits, config, "teacher"))
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=student,
        # The loss as an instance: Keras 3.15's default, the string
        # "kl_divergence", skips the softmax and the temperature squared
        # and compares the scaled logits themselves.
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=config.temperature,
            loss=keras.losses.KLDivergence()),
        student_loss_weight=config.student_loss_weight)
    distiller.compile(optimizer=optimizer_fn(), loss=_loss(),
                      metrics=[_accuracy()])
    return distiller
  return experiment.Experiment(
      name="distill_distilled", splits=splits, model_fn=model_fn,
      evaluate=lambda model, test_data: test_errors(model.student,
                                                    test_data))


def _run_and_print(config, strategy):
  results = run(config, strategy)
  print(format_table(results))
  return results


main = experiment.main_running(
    _run_and_print, partial_results="the interrupted part's results.json "
    "(teacher/, student/ or distilled/)")


def run(config, strategy):
  """The teacher (graph loop, once), then the student alone and distilled
  in every loop selected; writes and returns the combined results."""
  check(config)
  output_dir = config.output_dir or os.path.join("runs", "distill")
  # Read once, before anything is written: a bad dataset is one line.
  splits = image_splits(config)
  with contextlib.ExitStack() as stack:
    if config.fast_dev_run:
      output_dir = stack.enter_context(
          tempfile.TemporaryDirectory(prefix="fast_dev_run_"))
    parts = {role: os.path.join(output_dir, role) for role in ROLES}
    teacher_config = dataclasses.replace(
        config, loop="graph", output_dir=parts["teacher"],
        export_dir=os.path.join(parts["teacher"], "export"),
        epochs=(1 if config.fast_dev_run
                else config.teacher_epochs or config.epochs),
        # A dev run's teacher is kept until its students have run.
        fast_dev_run=False,
        limit_batches=1 if config.fast_dev_run else config.limit_batches)
    teacher = experiment.run(build(teacher_config, splits, "teacher"),
                             teacher_config, strategy)
    teacher_path = os.path.join(parts["teacher"], "export", "graph.keras")
    alone = experiment.run(
        build(config, splits, "student"),
        dataclasses.replace(config, output_dir=parts["student"]), strategy)
    distilled = experiment.run(
        build(config, splits, "distilled", teacher_path),
        dataclasses.replace(config, output_dir=parts["distilled"]),
        strategy)
    results = combined(config, teacher, alone, distilled)
    if not config.fast_dev_run:
      training_loops.write_json_atomically(
          os.path.join(output_dir, "results.json"), results, indent=2)
  return results


def combined(config, teacher, alone, distilled):
  """Per loop, the three test errors and the gap recovered."""
  teacher_errors = teacher["loops"]["graph"]["test"]["errors"]
  loops = {}
  for loop, report in distilled["loops"].items():
    student_errors = alone["loops"][loop]["test"]["errors"]
    distilled_errors = report["test"]["errors"]
    gap = student_errors - teacher_errors
    # Without a gap to close (a teacher no better than the student alone)
    # there is nothing to recover.
    loops[loop] = {
        "test": {"teacher_errors": teacher_errors,
                 "student_alone_errors": student_errors,
                 "student_distilled_errors": distilled_errors,
                 "gap_recovered": ((student_errors - distilled_errors) / gap
                                   if gap > 0 else None)},
        "wall_seconds": {
            "student_alone": alone["loops"][loop]["wall_seconds"],
            "student_distilled": report["wall_seconds"]}}
  return {"experiment": "distill", "flags": config.as_dict(),
          "seed": config.seed,
          "versions": experiment.versions(),
          "test_images": teacher["loops"]["graph"]["test"]["images"],
          "teacher": {"loop": "graph", "wall_seconds":
                      teacher["loops"]["graph"]["wall_seconds"]},
          "loops": loops}


def format_table(results):
  rows = [["loop", "teacher", "student alone", "distilled",
           "gap recovered", "training (s)"]]
  for loop, report in results["loops"].items():
    test, seconds = report["test"], report["wall_seconds"]
    recovered = test["gap_recovered"]
    rows.append([loop, str(test["teacher_errors"]),
                 str(test["student_alone_errors"]),
                 str(test["student_distilled_errors"]),
                 "-" if recovered is None else f"{100 * recovered:.0f}%",
                 f"{sum(seconds.values()):.0f}"])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths))
           for row in rows]
  lines.insert(1, "  ".join("-" * width for width in widths))
  return (f"distill on {results['flags']['dataset']}: test errors out of "
          f"{results['test_images']}\n" + "\n".join(lines))


if __name__ == "__main__":
  run_config.run_cli(Config, main)
