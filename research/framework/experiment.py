"""Runs one course experiment with each training loop and records results.

An `Experiment` says what to train (data, model, loss, metrics); `run`
trains it with the selected loops on identical data and seed, evaluates the
test split, and writes `results.json`, TensorBoard logs, checkpoints,
learning-curve plots and (optionally) SavedModels under the output dir.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from typing import Callable

import absl
from absl import flags, logging
import keras
import numpy as np
import sklearn
import tensorflow as tf
# The public API can turn op determinism on, but not say whether it is.
from tensorflow.python.framework import config as tf_config

import training_loops
from training_loops import drivers
from research.framework import datasets, optimizers, run_config, summaries

# A loop "matches" model.fit when its final training loss is this close
# (relative): float32 reassociation across graph rewrites, not more.
MATCH_TOLERANCE = 1e-3

# For datasets of in-memory arrays: nothing to prefetch or tune, and on a
# small machine tf.data's autotuning thread takes a core from the training
# steps for seconds at a time (see docs/performance.md).
IN_MEMORY_DATA_OPTIONS = tf.data.Options()
IN_MEMORY_DATA_OPTIONS.autotune.enabled = False


def _unchanged(value):
  return value


def _no_callbacks(loop, output_dir):
  del loop, output_dir
  return []


def _no_report(history, callbacks):
  del history, callbacks
  return {}


def _no_pictures(*args):
  del args


@dataclasses.dataclass
class Experiment:
  """What to train.

  Attributes:
    name: the experiment, e.g. "classify".
    splits: the data.
    model_fn: builds a fresh model (called inside the strategy's scope):
      `model_fn()` for the supervised step; for a model with its own
      training step (`loss` None), `model_fn(optimizer_fn)`, which
      compiles the model with optimizers `optimizer_fn()` builds from the
      optimizer flags.
    loss, metrics, loss_weights: as `training_loops.train` takes them;
      `metrics` are prototypes, copied per run. `loss` None: the model
      trains by its own `train_step`.
    inputs, targets: map feature / target arrays to the model's input and
      output structures (e.g. wide & deep's two inputs); `targets` None:
      batches of inputs alone.
    evaluate: `(model, test_data) -> dict`, the test split's results of a
      model with its own step; for the supervised step, results added to
      its test loss and metrics.
    callbacks: `(loop, output_dir) -> [callbacks]` for each run.
    loop_report: `(history, callbacks) -> dict` of extra per-loop results.
    loop_pictures: `(model, loop, output_dir)` draws a trained loop's
      pictures.
    run_pictures: `(results, output_dir)` draws the pictures comparing
      the loops, after the last.
    extra: experiment-level results (e.g. gradient norms at initialization).
  """
  name: str
  splits: datasets.Splits
  model_fn: Callable
  loss: object = None
  metrics: object = ()
  loss_weights: object = None
  inputs: Callable = _unchanged
  targets: Callable | None = _unchanged
  evaluate: Callable | None = None
  callbacks: Callable = _no_callbacks
  loop_report: Callable = _no_report
  loop_pictures: Callable = _no_pictures
  run_pictures: Callable = _no_pictures
  extra: dict = dataclasses.field(default_factory=dict)


def main_for(build):
  """A `main(config)` for an experiment: builds it with `build(config)` and
  runs it (`run`); bad settings or data end it with a one-line error."""
  return main_running(
      lambda config, strategy: run(build(config), config, strategy))


def main_running(run_fn, partial_results="results.json"):
  """A `main(config)` that calls `run_fn(config, strategy)` with the
  process configured and the strategy the config names; an interruption
  exits with 128 + its signal's number, saying where the partial results
  are (`partial_results`; None: nowhere), bad settings or data with one
  line."""
  def main(config):
    quiet_logs()
    configure_process(config)
    strategy = strategy_for(config)
    try:
      return run_fn(config, strategy)
    except training_loops.TrainingInterrupted as interruption:
      failed = getattr(interruption, "partial_results_error", None)
      where = (f" The partial results were not written: {failed}" if failed
               else f" Partial results are in {partial_results}."
               if partial_results else "")
      print(f"{interruption}{where} A rerun resumes.", file=sys.stderr)
      sys.exit(128 + interruption.signal_number)
    except ONE_LINE_ERRORS as error:
      sys.exit(f"error: {error}")
  return main


# What ends a script with one line, `error: <message>`, not a traceback:
# bad flags or data, and what a run meets that a traceback would not help
# with (a damaged or foreign checkpoint, a held directory, a failed write;
# an `OSError` is one a writer outside ours met, e.g. Keras'
# `ModelCheckpoint` under model.fit).
ONE_LINE_ERRORS = (datasets.DataError, run_config.SettingsError,
                   training_loops.CheckpointMismatchError,
                   training_loops.CheckpointNotSharedError,
                   training_loops.CollectiveMismatchError,
                   training_loops.DamagedCheckpointError,
                   training_loops.NonFiniteLossError,
                   training_loops.PeerRefusedError,
                   training_loops.RunLockedError,
                   training_loops.TrainingDataError,
                   training_loops.WorkerLostError,
                   training_loops.WriteError, OSError)


def quiet_logs():
  """Warnings and errors only, unless `--verbosity` says otherwise: every
  checkpoint save logs INFO lines, which would drown a script's output."""
  if not flags.FLAGS.is_parsed() or not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def configure_process(config):
  """Process-wide settings: op determinism (TensorFlow has no public way
  to turn it off again, so only a script's `main` turns it on)."""
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()


def strategy_for(config):
  """The `tf.distribute` strategy the flags name; exits with a one-line
  error for bad ones. Call it before anything runs a TensorFlow op: the CPU
  can be split into replicas only until then."""
  try:
    return training_loops.make_strategy(config.strategy,
                                        config.cpu_replicas)
  except (ValueError, RuntimeError) as error:
    sys.exit(f"error: {error}")


def run(experiment, config, strategy):
  """Trains `experiment` with each loop `config` selects; returns results.

  Every check of the flags against each other and the data comes first:
  a refused run writes nothing. The run holds a `training_loops.RunLock`
  on the output directory. With `--fast_dev_run` everything is written to
  a temporary directory, removed at the end. In a multi-worker run only
  the chief writes the run's files; the other workers train in step with
  it, each writing its checkpoints to a scratch copy that `RunCheckpoint`
  deletes and the rest to a temporary directory; when one refuses to start
  (the chief's held lock or changed flags), every worker stops with its
  reason.

  Args:
    config: the experiment's `run_config.RunConfig`.
    strategy: the `tf.distribute` strategy the flags name (`strategy_for`).

  Raises:
    training_loops.RunLockedError: a live run holds the output directory.
    training_loops.PeerRefusedError: another worker refused to start.
    training_loops.WriteError: a file could not be written.
    And the errors `training_loops.train` raises.
  """
  output_dir = config.output_dir or os.path.join("runs", experiment.name)
  loops = (training_loops.LOOPS if config.loop == "all"
           else (config.loop,))
  plan = RunPlan.checked(experiment, config, strategy, loops)
  if config.fast_dev_run:
    with tempfile.TemporaryDirectory(prefix="fast_dev_run_") as scratch:
      results = _run_loops(experiment, plan, loops, Outputs.within(scratch))
    print("fast_dev_run: every selected loop trained, validated and tested "
          "on one batch; nothing was kept.")
    return results
  chief = strategy.extended.should_checkpoint
  with contextlib.ExitStack() as held:
    with _refusal_shared(strategy):
      if chief:
        held.enter_context(training_loops.RunLock(output_dir))
        claim_output_dir(output_dir, experiment.name, config)
      else:
        check_output_dir(output_dir, experiment.name, config)
    if chief:
      return _run_loops(experiment, plan, loops, Outputs(
          output_dir, os.path.join(output_dir, "checkpoints"),
          config.export_dir))
    with tempfile.TemporaryDirectory(prefix="worker_outputs_") as scratch:
      return _run_loops(experiment, plan, loops, Outputs(
          scratch, os.path.join(output_dir, "checkpoints"),
          os.path.join(scratch, "export") if config.export_dir
          else None))


@contextlib.contextmanager
def _refusal_shared(strategy):
  """In a multi-worker run, every worker stops with the reason of the one
  that refused to start the run in the block (the chief, whose lock and
  run_config.json the others do not see): `training_loops.first_refusal`.
  Elsewhere the block's refusal is raised as it is."""
  if not training_loops.is_multi_worker(strategy):
    yield
    return
  try:
    yield
  except Exception as error:  # any reason to stop: the others must hear it
    _share_refusal(strategy, (str(error).strip().splitlines()
                              or [type(error).__name__])[0])
    raise
  refused = _share_refusal(strategy, None)
  if refused:
    raise training_loops.PeerRefusedError(*refused)


def _share_refusal(strategy, reason):
  """`training_loops.first_refusal`; a peer that never joins (it died) is
  a `WorkerLostError`."""
  try:
    return training_loops.first_refusal(strategy, reason)
  except training_loops.strategies.PEER_FAILURES as error:
    raise training_loops.WorkerLostError(None, error) from error


@dataclasses.dataclass(frozen=True)
class Outputs:
  """Where one process writes a run's files.

  Attributes:
    directory: results.json, plots, TensorBoard logs and HParams, and the
      callbacks' files.
    checkpoints: a checkpoint directory per loop inside it.
    export_dir: a SavedModel and a `.keras` file per loop, or None.
  """
  directory: str
  checkpoints: str
  export_dir: str | None = None

  @classmethod
  def within(cls, directory):
    """Everything, exports too, in `directory` (a temporary one)."""
    return cls(directory, os.path.join(directory, "checkpoints"),
               os.path.join(directory, "export"))


def _run_loops(experiment, plan, loops, outputs):
  config = plan.config
  results = {"experiment": experiment.name, "flags": config.as_dict(),
             "seed": config.seed, "versions": versions(),
             "op_determinism": tf_config.is_op_determinism_enabled(),
             "data": experiment.splits.sizes,
             "steps_per_epoch": plan.steps_per_epoch,
             "own_step": experiment.loss is None, **experiment.extra,
             "loops": {}}
  results_path = os.path.join(outputs.directory, "results.json")
  for loop in loops:
    try:
      results["loops"][loop] = _run_loop(experiment, loop, plan, outputs)
    except training_loops.TrainingInterrupted as interruption:
      history = interruption.history
      results["loops"][loop] = {"history": history.history,
                                "epochs": history.epochs,
                                "step_history": history.step_history,
                                **what_ran(history)}
      results["interrupted"] = {"loop": loop, "signal":
                                interruption.signal_name,
                                "epoch": interruption.epoch,
                                "step": interruption.step}
      try:
        training_loops.write_json_atomically(results_path, results, indent=2)
      except training_loops.WriteError as error:
        # The interruption still ends the run, with its exit code: its
        # checkpoint stands and a rerun resumes from it.
        interruption.partial_results_error = error
      raise
    # One architecture for every loop: its summary once.
    results["model"] = results["loops"][loop].pop("model")
  training_loops.write_json_atomically(results_path, results, indent=2)
  experiment.run_pictures(results, outputs.directory)
  print(format_table(results))
  return results


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What every loop of one run trains with, derived from the config once
  its flags are checked against each other and the data.

  Attributes:
    config: the resolved config.
    strategy: the `tf.distribute` strategy.
    epochs: `--epochs`, or 1 for `--fast_dev_run`.
    batches: how many batches of each split an epoch uses (None: all).
    overfit: whether training repeats the first `batches["train"]`
      batches, unshuffled.
    steps_per_epoch: training steps an epoch.
    optimizer_fn: builds the optimizer `--optimizer` and its flags name.
  """
  config: run_config.RunConfig
  strategy: object
  epochs: int
  batches: dict
  overfit: bool
  steps_per_epoch: int
  optimizer_fn: Callable

  @classmethod
  def checked(cls, experiment, config, strategy, loops):
    """The plan, or a `run_config.SettingsError` naming the flag."""
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
      # Uneven shards would give each replica's BatchNormalization and
      # dropout a different batch size from run to run of the same global
      # batch.
      raise run_config.SettingsError(
          f"--batch_size={config.batch_size} is not divisible by the "
          f"{replicas} replicas of --strategy={config.strategy}.")
    chosen = [name for name in ("fast_dev_run", "limit_batches",
                                "overfit_batches") if getattr(config, name)]
    if len(chosen) > 1:
      raise run_config.SettingsError(
          f"--{' and --'.join(chosen)} each choose the batches a run uses: "
          "pass one of them.")
    full = math.ceil(len(experiment.splits.y_train) / config.batch_size)
    limit = (1 if config.fast_dev_run else config.limit_batches
             or config.overfit_batches)
    if config.overfit_batches and config.overfit_batches > full:
      raise run_config.SettingsError(
          f"--overfit_batches={config.overfit_batches} is more than the "
          f"{full} training batches of {config.batch_size}; accepted: 1 "
          f"to {full}.")
    if config.checkpoint_every_steps and not any(
        map(_resumes_mid_epoch, loops)):
      resuming = filter(_resumes_mid_epoch, training_loops.LOOPS)
      raise run_config.SettingsError(
          f"--checkpoint_every_steps needs a loop that resumes inside an "
          f"epoch ({', '.join(resuming)}), not --loop={config.loop}.")
    steps_per_epoch = min(full, limit) if limit else full
    # A dev run's optimizer and schedule are the full run's: it checks
    # that run's code paths, cut short.
    schedule_steps = full if config.fast_dev_run else steps_per_epoch
    optimizers.check(config, schedule_steps, config.epochs)
    return cls(config=config, strategy=strategy,
               epochs=1 if config.fast_dev_run else config.epochs,
               batches={split: (limit if split == "train" or not
                                config.overfit_batches else None)
                        for split in ("train", "val", "test")},
               overfit=bool(config.overfit_batches),
               steps_per_epoch=steps_per_epoch,
               optimizer_fn=optimizers.optimizer_fn(
                   config, schedule_steps, config.epochs))

  def step_arguments(self, experiment):
    """The step's arguments of `training_loops.train` (and `compare`):
    the model, and the supervised step's optimizer, loss and options; for
    a model with its own step, a `model_fn` that compiles it with this
    run's optimizers."""
    if experiment.loss is None:
      return {"model_fn": functools.partial(experiment.model_fn,
                                            self.optimizer_fn)}
    return {"model_fn": experiment.model_fn,
            "optimizer_fn": self.optimizer_fn, "loss": experiment.loss,
            "metrics": experiment.metrics,
            "loss_weights": experiment.loss_weights}

  def dataset(self, experiment, split):
    """The batched split this run uses: the training split reshuffled
    every epoch from the seed (unless overfitting), each cut to its
    `batches`."""
    shuffled = split == "train" and not self.overfit
    dataset = make_dataset(experiment, split, self.config.batch_size,
                           self.config.seed if shuffled else None)
    if self.batches[split]:
      dataset = dataset.take(self.batches[split])
    return dataset


# A rerun may change these: more epochs continue training (unless the
# schedule spans the run: `_identity`); the rest only change what is shown
# or where it goes.
_RESUMABLE_CHANGES = ("epochs", "verbose", "output_dir", "export_dir")


def _identity(name, config):
  """The experiment and the flags a rerun into the same directory must
  keep."""
  resumable = set(_RESUMABLE_CHANGES)
  if config.lr_schedule == "cosine" and config.decay_steps is None:
    resumable.discard("epochs")  # the cosine spans the run's epochs
  return {"experiment": name, **{key: value for key, value
                                  in config.as_dict().items()
                                  if key not in resumable}}


def claim_output_dir(output_dir, name, config):
  """Records the run's config in `output_dir/run_config.json`, or checks
  it against the recorded one: a rerun resumes from the checkpoints there,
  which is only right for the same experiment and flags."""
  if not check_output_dir(output_dir, name, config):
    training_loops.write_json_atomically(
        os.path.join(output_dir, "run_config.json"), _identity(name, config))


def check_output_dir(output_dir, name, config):
  """Whether `output_dir` records a run's config; a `SettingsError` naming
  the flags that differ when it is not this run's."""
  identity = _identity(name, config)
  path = os.path.join(output_dir, "run_config.json")
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as stream:
    recorded = json.load(stream)
  # Keys of either side: a field only the recorded run had (another
  # experiment's) differs too.
  differences = [
      f"{key}: {_recorded_value(recorded, key)} then, "
      f"{identity.get(key)!r} now"
      for key in {**recorded, **identity}
      if recorded.get(key) != identity.get(key)]
  if differences:
    raise run_config.SettingsError(
        f"{output_dir} holds a run with other settings "
        f"({'; '.join(differences)}); its checkpoints would be resumed. "
        "Use another --output_dir, or delete that one.")
  return True


def _recorded_value(recorded, key):
  # Directories written before a script's own flags were recorded lack
  # them: say so, rather than show a `None` nobody passed.
  return repr(recorded[key]) if key in recorded else "not recorded"


def _run_loop(experiment, loop, plan, outputs):
  config, strategy = plan.config, plan.strategy
  output_dir = outputs.directory
  seed = config.seed
  keras.utils.set_random_seed(seed)  # before the data: it seeds the shuffle
  train_data, validation_data, test_data = (
      plan.dataset(experiment, split) for split in ("train", "val", "test"))
  callbacks = experiment.callbacks(loop, output_dir)
  checkpoint_every_steps = config.checkpoint_every_steps
  if checkpoint_every_steps and not _resumes_mid_epoch(loop):
    print(f"--checkpoint_every_steps: {loop} checkpoints at epoch ends "
          "only (it resumes only at an epoch's start).", file=sys.stderr)
    checkpoint_every_steps = None
  with dtype_policy(config.precision):
    history = training_loops.train(
        **plan.step_arguments(experiment), train_data=train_data, loop=loop,
        epochs=plan.epochs, validation_data=validation_data,
        strategy=strategy,
        checkpoint_dir=os.path.join(outputs.checkpoints, loop),
        log_dir=os.path.join(output_dir, "logs", loop), callbacks=callbacks,
        seed=seed, verbose=config.verbose,
        eval_every_steps=config.eval_every_steps,
        checkpoint_every_steps=checkpoint_every_steps)
  model = history.model
  test = {} if experiment.loss is None else training_loops.evaluate(
      model, experiment.loss, test_data, metrics=experiment.metrics,
      loss_weights=experiment.loss_weights, strategy=strategy)
  if experiment.evaluate:
    test.update(experiment.evaluate(model, test_data))
  experiment.loop_pictures(model, loop, output_dir)
  # Only numbers go to the table and HParams (an experiment's test results
  # may hold lists, e.g. each digit's share of a generator's samples).
  numbers = {key: value for key, value in test.items()
             if isinstance(value, (int, float))}
  plot_learning_curves(history, os.path.join(
      output_dir, f"learning_curves_{loop}.png"), f"{experiment.name}: {loop}")
  report = {"history": history.history, "epochs": history.epochs,
            "step_history": history.step_history, **what_ran(history),
            "test": test,
            "steps_per_second": typical_rate(history),
            "wall_seconds": sum(history.wall_seconds),
            "model": summaries.model_summary(model),
            **experiment.loop_report(history, callbacks)}
  if experiment.splits.num_classes and experiment.loss is not None:
    matrix = summaries.confusion_matrix(model, test_data,
                                      experiment.splits.num_classes)
    report["confusion_matrix"] = matrix
    summaries.plot_confusion_matrix(
        matrix, os.path.join(output_dir, f"confusion_matrix_{loop}.png"),
        f"{experiment.name}: {loop}, test split")
  summaries.log_hparams(
      os.path.join(output_dir, "hparams", loop),
      {"experiment": experiment.name, **config.as_dict(), "loop": loop},
      {**{key: values[-1] for key, values in history.history.items()
          if key.startswith("val_")},
       **{f"test_{key}": value for key, value in numbers.items()}})
  if outputs.export_dir:
    export(model, os.path.join(outputs.export_dir, loop))
    save_keras_file(model, os.path.join(outputs.export_dir, f"{loop}.keras"))
  return report


def what_ran(history):
  """What this invocation did: the checkpoint it resumed from (or None)
  and the steps it trained."""
  return {"resumed_from": history.resumed_from,
          "steps_trained": history.steps_trained}


def _resumes_mid_epoch(loop):
  return drivers.DRIVERS[loop].resumes_mid_epoch


@contextlib.contextmanager
def dtype_policy(name):
  """Keras' global dtype policy `name` while models are built and trained
  (under `mixed_float16`, compiling wraps the optimizer in a
  `LossScaleOptimizer`, as fit's `auto_scale_loss` does)."""
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(name)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def make_dataset(experiment, split, batch_size, shuffle_seed=None):
  """A batched `tf.data.Dataset` of split "train", "val" or "test"; the
  training split is reshuffled every epoch from `shuffle_seed`."""
  splits = experiment.splits
  x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
  dataset = tf.data.Dataset.from_tensor_slices(
      experiment.inputs(x) if experiment.targets is None
      else (experiment.inputs(x), experiment.targets(y)))
  if shuffle_seed is not None:
    dataset = dataset.shuffle(len(y), seed=shuffle_seed,
                              reshuffle_each_iteration=True)
  return dataset.batch(batch_size).with_options(IN_MEMORY_DATA_OPTIONS)


def typical_rate(history):
  """Median steps/s over the epochs after the first (which traces)."""
  rates = history.steps_per_second[1:] or history.steps_per_second
  return statistics.median(rates) if rates else 0.0


def versions():
  return {"python": platform.python_version(), "tensorflow": tf.__version__,
          "keras": keras.__version__, "numpy": np.__version__,
          "scikit-learn": sklearn.__version__,
          "absl-py": getattr(absl, "__version__", "unknown")}


def export(model, path):
  """Exports a SavedModel (`model.export`) to `path`, replacing any previous
  export only once the new one is complete."""
  with training_loops.replaced_atomically(path) as temporary:
    model.export(temporary, verbose=False)


def save_keras_file(model, path):
  """Saves `model` as a `.keras` file, replacing any previous one only once
  the new one is complete."""
  with training_loops.replaced_atomically(path) as temporary:
    model.save(temporary)


def plot_learning_curves(history, path, title):
  """Every per-epoch curve on one chart, as the course plots them; skipped
  when matplotlib (the `plot` extra) is not installed."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
  except ImportError:
    return
  figure, axes = pyplot.subplots(figsize=(8, 5))
  # The learning rate has its own scale: TensorBoard and results.json show
  # it.
  for key, values in sorted(history.history.items()):
    if key == "learning_rate":
      continue
    axes.plot(history.epochs, values, label=key,
              linestyle="--" if key.startswith("val_") else "-")
  axes.set(xlabel="epoch", title=title)
  axes.grid(True)
  axes.legend()
  with training_loops.replaced_atomically(path) as temporary:
    figure.savefig(temporary, dpi=80)
  pyplot.close(figure)


def format_table(results):
  """One row per loop: final losses and metrics, speed, agreement with fit.

  A model with its own step shows its final training logs and its test
  results, and agrees with fit when its first training log does."""
  loops = results["loops"]
  fit = loops.get("keras_fit")
  if results.get("own_step"):
    # "loss" first: the one fit's agreement is judged on, when logged.
    train_keys = sorted(
        (key for key in next(iter(loops.values()))["history"]
         if not key.startswith("val_")
         and not key.endswith("learning_rate")),
        key=lambda key: key != "loss")
    test_keys = [key for key, value in
                 next(iter(loops.values()))["test"].items()
                 if isinstance(value, (int, float))]
    header = ["loop", *(f"train {key}" for key in train_keys),
              *(f"test {key}" for key in test_keys)]
    rows = [[loop, *(_final(report, key) for key in train_keys),
             *(f"{report['test'][key]:.4f}" for key in test_keys)]
            for loop, report in loops.items()]
    matched = train_keys[0] if train_keys else None
  else:
    metric_names = sorted({key for report in loops.values()
                           for key in report["test"] if key != "loss"})
    header = ["loop", "train loss", "val loss", "test loss"]
    header += [f"test {name}" for name in metric_names]
    rows = [[loop, _final(report, "loss"), _final(report, "val_loss"),
             f"{report['test']['loss']:.4f}",
             *(f"{report['test'][name]:.4f}" for name in metric_names)]
            for loop, report in loops.items()]
    matched = "loss"
  header += ["steps/s", "vs fit", "matches fit"]
  for row, report in zip(rows, loops.values()):
    row += _against_fit(report, fit, matched)
  rows.insert(0, header)
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths))
           for row in rows]
  lines.insert(1, "  ".join("-" * width for width in widths))
  return f"{results['experiment']} on {results['flags']['dataset']}:\n" + (
      "\n".join(lines))


def _final(report, key):
  values = report["history"].get(key)
  return f"{values[-1]:.4f}" if values else "-"


def _against_fit(report, fit, key):
  """steps/s, its ratio to fit's, and whether the final `key` log matches
  fit's."""
  cells = [f"{report['steps_per_second']:.0f}"]
  if not (fit and key and fit["history"].get(key)
          and report["history"].get(key)):
    return cells + ["-", "-"]
  final, fit_final = report["history"][key][-1], fit["history"][key][-1]
  ratio = report["steps_per_second"] / max(fit["steps_per_second"], 1e-9)
  matches = math.isclose(final, fit_final, rel_tol=MATCH_TOLERANCE)
  return cells + [f"{ratio:.2f}x", "yes" if matches else
                  f"no ({final / fit_final - 1:+.1e})"]
