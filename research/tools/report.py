"""The reproduction report: every experiment on the real data, with charts.

Runs classify (three normalizations), deep_net (five architectures),
early_stopping, regress, wide & deep (three variants), hparam_search, the VAE,
the GAN and WGAN-GP (judged by the report's own classify run) and
distillation, each into its own directory under `<output_dir>/runs/<name>`
(a rerun resumes them), and writes `<output_dir>/REPORT.md` with PNG charts
beside it: the figures read back from each run's results.json, each beside
its published anchor; California housing's beside scikit-learn's
MLPRegressor, fitted by the report on the regress run's split into
`<output_dir>/runs/sklearn_reference` (research.tools.sklearn_reference).

    python -m research report --data_dir=../shared/data \\
        --output_dir=runs/report [--quick]

`--data_dir` holds `mnist/` (the IDX files) and `california-housing/`
(`cal_housing.csv`), as ../shared/data does.
"""

import dataclasses
import json
import os
import sys
import time

from matplotlib import figure as matplotlib_figure, ticker
import numpy as np

import training_loops
from research.experiments import (classify, deep_net, distill, early_stopping,
                                  gan, hparam_search, regress, vae, wide_deep)
from research.framework import datasets, experiment, run_config, summaries
from research.tools import sklearn_reference



@dataclasses.dataclass(frozen=True)
class Config(run_config.RunConfig):
  """Where the data is and the report goes, `--quick`, and the shared
  settings: each one changed from its default (`--seed`, `--loop`,
  `--precision`, `--epochs`, ...) applies to every run."""
  data_dir: str | None = run_config.setting(
      None, "Directory holding mnist/ and california-housing/ (see "
      "../shared/data).")
  output_dir: str | None = run_config.setting(
      None, "Where REPORT.md, its charts and every run (runs/<name>) go; a "
      "rerun resumes the runs there.")
  quick: bool = run_config.setting(
      False, "A reduced report in a few minutes: 2 epochs of at most 20 "
      "batches per split, the smallest search, fewer samples for the "
      "generative models' scores; --epochs and --limit_batches win.")


# What the report sets for each run itself.
_PER_RUN = ("dataset", "data_dir", "output_dir", "export_dir")


# --quick's settings, unless --epochs or --limit_batches say otherwise:
# every run's, and some experiments' own.
QUICK = {"epochs": 2, "limit_batches": 20}
QUICK_BY_SCRIPT = {
    hparam_search: {"sweep_points": 2, "search_iterations": 1,
                    "cv_folds": 2},
    vae: {"nll_samples": 100},
    gan: {"score_samples": 1000},
    # The teacher for --epochs, as the students.
    distill: {"teacher_epochs": None}}

# LeCun, Bottou, Bengio and Haffner (1998), test error (%) on MNIST.
CITATION = ("LeCun, Bottou, Bengio and Haffner (1998), \"Gradient-based "
            "learning applied to document recognition\", Proc. IEEE "
            "86(11)")
# Their "3-layer NN" has two hidden layers, as the course's network.
LECUN_ROWS = (("3-layer NN, 300+100 hidden units", 3.05),
              ("3-layer NN, 500+150 hidden units", 2.95),
              ("3-layer NN, 300+100 hidden units, distortions", 2.5),
              ("2-layer NN, 300 hidden units", 4.7))

# The directory under `runs/` of scikit-learn's MLPRegressor, fitted by the
# report on the regress run's split (research.tools.sklearn_reference).
_SKLEARN_RUN = "sklearn_reference"
_SKLEARN_LABEL = "scikit-learn MLPRegressor (computed in this run)"

_DPI = 80


@dataclasses.dataclass(frozen=True)
class Run:
  """One experiment of the report.

  Attributes:
    name: its directory under `runs/` and its name in the report.
    script: the research module that builds it.
    data: the directory under `--data_dir` holding its dataset.
    given: its config's fields, as if given on its command line.
  """
  name: str
  script: object
  data: str
  given: dict


_MNIST = {"dataset": "mnist"}
_CALIFORNIA = {"dataset": "california_housing"}

RUNS = (
    *(Run(f"classify_{normalize}", classify, "mnist",
          {**_MNIST, "normalize": normalize})
      for normalize in ("none", "zscore", "minmax")),
    *(Run(f"deep_net_{name}", deep_net, "mnist",
          {**_MNIST, "activation": activation, "batchnorm": batchnorm,
           "dropout": dropout})
      for name, activation, batchnorm, dropout in (
          ("relu", "relu", False, "none"), ("selu", "selu", False, "none"),
          ("batchnorm", "relu", True, "none"),
          ("dropout", "relu", False, "standard"),
          ("alpha_dropout", "selu", False, "alpha"))),
    Run("early_stopping", early_stopping, "mnist", _MNIST),
    Run("regress", regress, "california-housing", _CALIFORNIA),
    *(Run(f"wide_deep_{variant}", wide_deep, "california-housing",
          {**_CALIFORNIA, "wide_deep_variant": variant, "aux_output": False})
      for variant in ("functional", "subclassed", "multi_input")),
    Run("hparam_search", hparam_search, "california-housing", _CALIFORNIA),
    Run("vae", vae, "mnist", _MNIST),
    *(Run(objective, gan, "mnist", {**_MNIST, "objective": objective})
      for objective in ("gan", "wgan_gp")),
    Run("distill", distill, "mnist", _MNIST),
)

# Burda, Grosse and Salakhutdinov (2016), Importance Weighted Autoencoders,
# Table 1: a VAE with one stochastic layer, trained for 3,280 epochs, its
# test NLL estimated with k=5000 samples; and the goals set for ours.
VAE_ANCHORS = (("Burda et al. (2016), Table 1: VAE, one stochastic layer, "
                "k=1", "86.76", "-"),
               ("this project's goal", "<= 90", "<= 95"))

# Goals set for the GANs: neither paper scores MNIST samples in a way a
# classifier can reproduce (Goodfellow et al. give a Parzen-window
# log-likelihood, Gulrajani et al. samples only).
GAN_GOALS = {"inception_score": 9.0, "digit_share": (0.05, 0.15)}

# Hinton, Vinyals and Dean (2015), section 3: test errors on MNIST of the
# teacher, the student alone and the distilled student, and the share of
# the gap recovered; and the goal set for ours.
HINTON_ERRORS = (67, 146, 74)
DISTILL_GOAL = 0.8

# The run whose confusion matrix the report shows, and whose classifier
# judges the GANs: classify's MNIST recipe.
_RECIPE_RUN = "classify_minmax"


def _report(config, strategy):
  """Runs (or resumes) every run of `RUNS` into `config.output_dir` and
  writes REPORT.md there; bad settings or data are refused before anything
  is written."""
  data_dir, output_dir = config.data_dir, config.output_dir
  if not output_dir:
    raise run_config.SettingsError(
        "--output_dir is required: where REPORT.md and the runs go.")
  if config.dataset or config.export_dir:
    raise run_config.SettingsError(
        "--dataset and --export_dir are set by the report for each run; "
        "accepted: neither.")
  defaults = run_config.RunConfig()
  changed = {field.name: getattr(config, field.name)
             for field in dataclasses.fields(run_config.RunConfig)
             if field.name not in _PER_RUN
             and getattr(config, field.name) != getattr(defaults,
                                                        field.name)}
  every_run = {**(QUICK if config.quick else {}), **changed}
  runs_dir = os.path.join(output_dir, "runs")
  # The judge of the GANs: the recipe run's graph loop, exported.
  own = {_RECIPE_RUN: {"export_dir": os.path.join(runs_dir, _RECIPE_RUN,
                                                  "export")},
         **{run.name: {"judge_dir": os.path.join(runs_dir, _RECIPE_RUN)}
            for run in RUNS if run.script is gan}}
  if not data_dir or not os.path.isdir(data_dir):
    raise datasets.DataError(f"--data_dir {data_dir!r} is not a directory "
                             "(it holds mnist/ and california-housing/).")
  configs = [run.script.Config.resolved(
      **{**run.given, **every_run,
         **(QUICK_BY_SCRIPT.get(run.script, {}) if config.quick else {}),
         **own.get(run.name, {}),
         "data_dir": os.path.join(data_dir, run.data),
         "output_dir": os.path.join(runs_dir, run.name)})
             for run in RUNS]
  # Every experiment's own checks, before the first run too.
  for run, run_settings in zip(RUNS, configs):
    if hasattr(run.script, "check"):
      run.script.check(run_settings)
  # Every dataset read before the first run: a bad file ends the report at
  # once, not after hours of the experiments before it.
  for dataset, directory in sorted({(run_settings.dataset,
                                     run_settings.data_dir)
                                    for run_settings in configs}):
    datasets.load(dataset, directory)
  finished = [(run, *_run(run, run_settings, strategy))
              for run, run_settings in zip(RUNS, configs)]
  reference = _sklearn_reference(runs_dir, finished, config.quick)
  write_report(output_dir, finished, quick=config.quick, reference=reference)
  print(f"Wrote {os.path.join(output_dir, 'REPORT.md')}")


main = experiment.main_running(
    _report, partial_results="the interrupted run's results.json under "
    "runs/")


def _run(run, config, strategy):
  """Runs (or resumes) one experiment; its results.json and wall time."""
  print(f"== {run.name}", flush=True)
  start = time.monotonic()
  if run.script is hparam_search:
    hparam_search.sweep_and_search(config, strategy, config.output_dir)
  elif run.script is distill:
    distill.run(config, strategy)
  else:
    experiment.run(run.script.build(config), config, strategy)
  seconds = time.monotonic() - start
  with open(os.path.join(config.output_dir, "results.json"),
            encoding="utf-8") as stream:
    return json.load(stream), seconds


def _sklearn_reference(runs_dir, finished, quick):
  """scikit-learn's MLPRegressor on the regress run's split (its dataset,
  data directory and seed, as its results.json records them), into
  `runs/sklearn_reference`; its results and wall time."""
  print(f"== {_SKLEARN_RUN}", flush=True)
  start = time.monotonic()
  regress_results = next(result for run, result, _ in finished
                         if run.name == "regress")
  run_flags = regress_results["flags"]
  reference = sklearn_reference.reference(
      os.path.join(runs_dir, _SKLEARN_RUN), run_flags["dataset"],
      run_flags["data_dir"], regress_results["seed"],
      sklearn_reference.QUICK_MAX_ITER if quick
      else sklearn_reference.MAX_ITER)
  return reference, time.monotonic() - start


# ------------------------------------------------------------------ report


def write_report(output_dir, finished, quick, reference):
  """Writes REPORT.md and its charts into `output_dir`.

  Args:
    output_dir: the report's directory.
    finished: `(Run, results, wall seconds)` for every run of `RUNS`.
    quick: whether the runs were `--quick`'s.
    reference: `(results, wall seconds)` of scikit-learn's MLPRegressor
      (`sklearn_reference.reference`).
  """
  results = {run.name: result for run, result, _ in finished}
  sections = [
      "# The course's experiments, a VAE, GANs and distillation, on MNIST "
      "and California housing",
      ("**Quick run** (`--quick`): few epochs on a few batches; the "
       "figures show the pipeline works, not what the recipes reach."
       if quick else "Each script's defaults and dataset recipes."),
      _normalization_section(output_dir, results),
      _anchor_section(output_dir, results),
      _deep_net_section(output_dir, results),
      _callbacks_section(results),
      _california_section(results, reference[0], quick),
      _vae_section(results),
      _gan_section(results),
      _distill_section(results),
      _loops_section(output_dir, results),
      _runs_section(finished, reference)]
  path = os.path.join(output_dir, "REPORT.md")
  with training_loops.replaced_atomically(path) as temporary:
    with open(temporary, "w", encoding="utf-8") as stream:
      stream.write("\n\n".join(sections) + "\n")


def error_percent(report):
  """A classifier loop's test error in percent."""
  return 100 * (1 - report["test"]["accuracy"])


def _percent(value):
  return f"{value:.2f}%"


def _table(header, rows):
  lines = [header, ["---"] * len(header), *rows]
  return "\n".join("| " + " | ".join(map(str, line)) + " |"
                   for line in lines)


def _loops(results):
  return list(results["loops"])


def _shown_loop(results):
  """The loop a one-loop chart shows: graph, the course's fastest."""
  return "graph" if "graph" in results["loops"] else _loops(results)[0]


def _epochs(report):
  """A loop's epochs, counted from 1 (results.json counts from 0)."""
  return [epoch + 1 for epoch in report["epochs"]]


def _by_epoch(axes):
  axes.set(xlabel="epoch")
  axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  axes.grid(True)


def _image(name):
  """The Markdown link to a picture beside REPORT.md."""
  return f"![{name}]({name})"


def _save(figure, output_dir, name):
  """Writes `figure` as `output_dir/name`; its Markdown image link."""
  figure.tight_layout()
  with training_loops.replaced_atomically(
      os.path.join(output_dir, name)) as temporary:
    figure.savefig(temporary, dpi=_DPI, format="png")
  return _image(name)


def _normalization_section(output_dir, results):
  runs = [name for name in results if name.startswith("classify_")]
  loops = _loops(results[runs[0]])
  rows = [[results[name]["flags"]["normalize"],
           *(_percent(error_percent(results[name]["loops"][loop]))
             for loop in loops)] for name in runs]
  figure = matplotlib_figure.Figure(figsize=(9, 3.5))
  loss_axes, accuracy_axes = figure.subplots(1, 2)
  loop = _shown_loop(results[runs[0]])
  for name in runs:
    report = results[name]["loops"][loop]
    label = f"normalize={results[name]['flags']['normalize']}"
    loss_axes.plot(_epochs(report), report["history"]["val_loss"],
                   marker=".", label=label)
    accuracy_axes.plot(_epochs(report), report["history"]["val_accuracy"],
                       marker=".", label=label)
  loss_axes.set(ylabel="validation loss",
                title=f"classify on MNIST: {loop} loop")
  accuracy_axes.set(ylabel="validation accuracy")
  for axes in (loss_axes, accuracy_axes):
    _by_epoch(axes)
    axes.legend()
  return "\n\n".join([
      "## 1. Input normalization (classify, 784-300-100-10, MNIST)",
      "Test error per normalization and loop; the rest of each run is "
      "classify's MNIST recipe.",
      _table(["normalize", *loops], rows),
      _save(figure, output_dir, "normalization.png")])


def _anchor_section(output_dir, results):
  recipe = results[_RECIPE_RUN]
  rows = [[f"ours: classify, MNIST recipe, {loop} loop",
           _percent(error_percent(report))]
          for loop, report in recipe["loops"].items()]
  rows += [[f"LeCun et al. (1998): {name}", _percent(error)]
           for name, error in LECUN_ROWS]
  loop = _shown_loop(recipe)
  matrix = recipe["loops"][loop]["confusion_matrix"]
  picture = "confusion_matrix.png"
  summaries.plot_confusion_matrix(
      matrix, os.path.join(output_dir, picture),
      f"MNIST test split: classify, {loop} loop")
  return "\n\n".join([
      "## MNIST against the published table",
      f"Anchors: {CITATION}, Fig. 9. The 784-300-100-10 network is their "
      "\"300+100 hidden units\" row.",
      _table(["model", "test error"], rows),
      f"The MNIST test confusion matrix ({_RECIPE_RUN}, {loop} loop; rows: "
      "true digit, columns: predicted):",
      _image(picture)])


def _deep_net_section(output_dir, results):
  runs = [name for name in results if name.startswith("deep_net_")]
  loops = _loops(results[runs[0]])
  figure = matplotlib_figure.Figure(figsize=(7, 4))
  axes = figure.subplots()
  rows, first_and_last = [], {}
  for name in runs:
    norms = [np.mean(batches)
             for batches in results[name]["gradient_norms"].values()]
    label = _architecture(**results[name]["architecture"])
    axes.plot(range(1, len(norms) + 1), norms, marker=".", label=label)
    first, last = f"{norms[0]:.2e}", f"{norms[-1]:.2e}"
    first_and_last[name] = (float(first), float(last))
    rows.append([name, label, first, last,
                 *(_percent(error_percent(results[name]["loops"][loop]))
                   for loop in loops)])
  axes.set(xlabel="hidden layer (input side first)", yscale="log",
           ylabel="kernel-gradient norm at init",
           title="deep_net on MNIST: gradients at initialization")
  axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  axes.grid(True)
  axes.legend()
  return "\n\n".join([
      "## 2. Vanishing gradients (deep_net: 20 x Dense(100), MNIST)",
      "Kernel-gradient norms of the hidden layers at initialization (mean "
      "over the first batches). Vanishing gradients would show as norms "
      "shrinking towards the input, the first layers barely learning. "
      + gradient_norm_comparison(first_and_last),
      _table(["run", "architecture", "grad norm, layer 1",
              "grad norm, last layer",
              *(f"test error, {loop}" for loop in loops)], rows),
      _save(figure, output_dir, "gradient_norms.png")])


def gradient_norm_comparison(first_and_last):
  """What the gradient-norm table shows, in a sentence: in how many runs
  the first hidden layer's norm is larger than the last's (the input side's
  than the output side's), and in which.

  Args:
    first_and_last: `{run: (first hidden layer's norm, last's)}`, as the
      table shows them.
  """
  larger = [name for name, (first, last) in first_and_last.items()
            if first > last]
  smaller = [name for name, (first, last) in first_and_last.items()
             if first < last]
  equal = [name for name in first_and_last
           if name not in larger and name not in smaller]
  total = len(first_and_last)

  def which(names):
    return f" ({', '.join(names)})" if names else ""

  parts = [f"larger at the input (layer 1) than at the output (the last "
           f"hidden layer) in {len(larger)} of {total} runs"
           f"{which(larger)}",
           f"smaller in {len(smaller)}{which(smaller)}"]
  if equal:
    parts.append(f"equal in {len(equal)}{which(equal)}")
  return (f"In the table, the norm is {', '.join(parts[:-1])} and "
          f"{parts[-1]}.")


def _architecture(activation, batchnorm, dropout):
  """deep_net's architecture in words, e.g. "selu, alpha dropout"."""
  return ", ".join([activation, *(["batch norm"] if batchnorm else []),
                    *([f"{dropout} dropout"] if dropout != "none" else [])])


def _callbacks_section(results):
  run = results["early_stopping"]
  rows = []
  for loop, report in run["loops"].items():
    val_loss = report["history"]["val_loss"]
    best = int(np.argmin(val_loss))
    rows.append([loop, report["epochs_run"],
                 "did not stop" if report["stopped_epoch"] is None
                 else report["stopped_epoch"] + 1, _epochs(report)[best],
                 f"{report['best_val_loss']:.4f}",
                 _percent(error_percent(report))])
  return "\n\n".join([
      "## 3. Early stopping (MNIST)",
      f"EarlyStopping on val_loss, patience {run['patience']}, restoring "
      "the best weights (the test error is theirs); epochs counted from "
      "1.",
      _table(["loop", "epochs run", "stopped at epoch", "best epoch",
              "best val loss", "test error"], rows)])


def _california_section(results, reference, quick):
  runs = ["regress", *(name for name in results
                       if name.startswith("wide_deep_"))]
  loops = _loops(results[runs[0]])
  rows = [[name, *(f"{results[name]['loops'][loop]['test']['loss']:.4f}"
                   for loop in loops)] for name in runs]
  search = results["hparam_search"]
  found = search["random_search"]
  rows.append([f"hparam_search best: {json.dumps(found['best_params'])}",
               *(f"{found['test_mse']:.4f}"
                 if loop == search["flags"]["loop"] else "-"
                 for loop in loops)])
  sweep = [[f"{row['learning_rate']:.1e}", f"{row['val_loss']:.4f}",
            f"{row['test_loss']:.4f}"]
           for row in search["learning_rate_sweep"]]
  models = reference["models"]
  settings = reference["settings"]
  described = [(sklearn_reference.describe(model["hidden_layer_sizes"]),
                model) for model in models]
  reference_rows = [
      [f"{_SKLEARN_LABEL}: {words}", f"{model['test_mse']:.4f}",
       model["iterations"],
       "yes" if model["converged"] else "no (stopped at max_iter)"]
      for words, model in described]
  return "\n\n".join([
      "## 4. California housing: test MSE",
      "The course net (regress), the wide & deep variants and the "
      "hyperparameter search's best (its loop only; cross-validated MSE "
      f"{found['best_cv_mse']:.4f}), beside scikit-learn's MLPRegressor "
      "fitted in this run on the same split and standardized features ("
      + ", ".join(f"{model['test_mse']:.4f} with {words}"
                  for words, model in described) + ").",
      _table(["model", *(f"test MSE, {loop}" for loop in loops)], rows),
      f"{_SKLEARN_LABEL}: regress's training split "
      f"({reference['data']['train']} examples, dataset "
      f"`{settings['dataset']}`, seed {settings['seed']}), features "
      "standardized on it (StandardScaler), scikit-learn's defaults "
      "otherwise (Adam, ReLU) with random_state the seed and at most "
      f"{settings['max_iter']} iterations; test MSE on regress's "
      f"{reference['data']['test']} test examples. "
      + ("**Quick run**: at most "
         f"{settings['max_iter']} iterations (scikit-learn's default is "
         f"{sklearn_reference.MAX_ITER}), so these are not the full "
         "reference. " if quick else "")
      + f"Results in `runs/{_SKLEARN_RUN}/results.json`.",
      _table(["model", "test MSE", "iterations", "converged (tol)"],
             reference_rows),
      f"hparam_search's learning-rate sweep ({search['flags']['loop']} "
      "loop):",
      _table(["learning rate", "final val MSE", "test MSE"], sweep)])


def _vae_section(results):
  run = results["vae"]
  rows = [[f"ours: {loop} loop", f"{report['test']['nll']:.2f}",
           f"{report['test']['neg_elbo']:.2f}",
           f"{report['test']['reconstruction']:.2f}",
           f"{report['test']['kl']:.2f}"]
          for loop, report in run["loops"].items()]
  rows += [[name, nll, neg_elbo, "-", "-"]
           for name, nll, neg_elbo in VAE_ANCHORS]
  flags_ = run["flags"]
  directory = os.path.join("runs", "vae")
  loop = _shown_loop(run)
  return "\n\n".join([
      "## 5. A VAE on binarized MNIST (Kingma & Welling, 2014)",
      f"784-{flags_['hidden_units']}-{flags_['hidden_units']}-"
      f"{flags_['latent_dim']} Gaussian latent, Bernoulli decoder, the "
      "training images binarized afresh at every step, the test images "
      "once. Test figures in nats per image: the importance-weighted "
      f"negative log-likelihood estimate (k={flags_['nll_samples']}), "
      "and the negative ELBO with its parts.",
      _table(["model", "test NLL", "test -ELBO", "reconstruction", "KL"],
             rows),
      f"Samples from the prior and test reconstructions ({loop} loop):",
      _image(os.path.join(directory, f"samples_{loop}.png")),
      _image(os.path.join(directory, f"reconstructions_{loop}.png"))])


def _averaged(flags_):
  """Where the samples come from, when not the generator itself."""
  decay = flags_.get("generator_average")
  return (f", sampled from a moving average of the generator's weights "
          f"(decay {decay})" if decay else "")


def _gan_section(results):
  runs = [name for name, run in results.items()
          if run.get("experiment") == "gan"]
  low, high = GAN_GOALS["digit_share"]
  rows = [[f"ours: {results[name]['objective']}, {loop} loop",
           f"{report['test']['inception_score']:.2f}",
           f"{report['test']['fid']:.2f}",
           f"{_percent(100 * report['test']['min_digit_share'])} - "
           f"{_percent(100 * report['test']['max_digit_share'])}"]
          for name in runs
          for loop, report in results[name]["loops"].items()]
  judge = results[runs[0]]["judge"]
  real = judge["real_test"]
  rows += [["the test images themselves (the ceiling)",
            f"{real['inception_score']:.2f}", "0",
            f"{_percent(100 * min(real['digit_shares']))} - "
            f"{_percent(100 * max(real['digit_shares']))}"],
           ["this project's goal",
            f">= {GAN_GOALS['inception_score']:.1f}", "-",
            f"each digit in {_percent(100 * low)} - {_percent(100 * high)}"]]
  flags_ = results[runs[0]]["flags"]
  judge_loop = os.path.splitext(os.path.basename(judge["path"]))[0]
  parts = [
      "## 6. GANs on MNIST (Goodfellow et al., 2014; Gulrajani et al., "
      "2017)",
      "The non-saturating GAN (`gan`) and WGAN-GP (`wgan_gp`), each with "
      f"{flags_['networks']} networks and two {flags_['optimizer']} "
      f"optimizers{_averaged(flags_)}, judged by the report's own MNIST "
      "classifier "
      f"({_RECIPE_RUN}'s {judge_loop} loop, test error "
      f"{_percent(100 * judge['test_error'])}): the Inception Score of "
      f"{flags_['score_samples']} samples under it, "
      "the Fréchet distance between the samples' and the test images' "
      "activations in its last hidden layer, and the smallest and largest "
      "share of a digit among the samples. Neither paper scores MNIST "
      "samples in a way a classifier reproduces (Goodfellow et al. give a "
      "Parzen-window log-likelihood, Gulrajani et al. pictures): the "
      "anchors are the test images' own scores and the goal.",
      _table(["model", "Inception Score", "Fréchet distance",
              "digit shares"], rows)]
  for name in runs:
    run = results[name]
    loop = _shown_loop(run)
    last = run["loops"][loop]["scores_per_epoch"]["epoch"][-1] + 1
    directory = os.path.join("runs", name)
    parts += [f"{run['objective']}: the same noise's samples after the "
              f"last epoch ({loop} loop), and the scores per epoch of "
              "every loop:",
              _image(os.path.join(directory, f"scores_{loop}",
                                  f"epoch_{last:03d}.png")),
              _image(os.path.join(directory,
                                  "inception_score_per_epoch.png"))]
  return "\n\n".join(parts)


def _distill_section(results):
  run = results["distill"]
  rows = []
  for loop, report in run["loops"].items():
    test = report["test"]
    recovered = test["gap_recovered"]
    rows.append([f"ours: {loop} loop", test["teacher_errors"],
                 test["student_alone_errors"],
                 test["student_distilled_errors"],
                 "-" if recovered is None else f"{100 * recovered:.0f}%"])
  teacher, alone, distilled = HINTON_ERRORS
  rows += [["Hinton et al. (2015), section 3", teacher, alone, distilled,
            f"{100 * (alone - distilled) / (alone - teacher):.0f}%"],
           ["this project's goal", "-", "-", "-",
            f">= {100 * DISTILL_GOAL:.0f}%"]]
  flags_ = run["flags"]
  return "\n\n".join([
      "## 7. Distillation on MNIST (Hinton, Vinyals & Dean, 2015)",
      f"A teacher of two hidden layers of {flags_['teacher_units']} "
      "(dropout, inputs jittered by up to 2 pixels; the graph loop, "
      f"once), a student of two hidden layers of {flags_['student_units']}"
      " trained alone, and the same student trained on the teacher's "
      f"soft targets at temperature {flags_['temperature']:g} (Keras' "
      "Distiller, labels weighted "
      f"{flags_['student_loss_weight']:g}). Test errors out of "
      f"{run['test_images']}, and the share of the gap between the "
      "student alone and the teacher that distillation recovers.",
      _table(["model", "teacher", "student alone", "distilled student",
              "gap recovered"], rows)])


def _loops_section(output_dir, results):
  parts = ["## 8. Do the loops agree?",
           "For each experiment, every loop on the same data and seed: "
           "the final figures (`matches fit`: the final training loss, or "
           "a model's own first training log, within "
           f"{experiment.MATCH_TOLERANCE:g} of model.fit's, relative), and "
           "all loops' learning curves on one chart (solid: training, "
           "dashed: validation; the first loops drawn widest, so curves "
           "that agree show as nested lines)."]
  for name, run in _runs_with_loops(output_dir, results):
    parts += [f"### {name}", f"```\n{experiment.format_table(run)}\n```",
              _save(_loops_figure(name, run), output_dir,
                    f"loops_{name.replace('/', '_')}.png")]
  return "\n\n".join(parts)


def _runs_with_loops(output_dir, results):
  """`(name, results)` of every run trained by each loop: distill's are
  its students', in their own directories."""
  for name, run in results.items():
    if run.get("experiment") == "distill":
      for role in ("student", "distilled"):
        path = os.path.join(output_dir, "runs", name, role, "results.json")
        with open(path, encoding="utf-8") as stream:
          yield f"{name}/{role}", json.load(stream)
    elif "loops" in run:  # not hparam_search: one loop, in section 4
      yield name, run


def _loops_figure(name, run):
  figure = matplotlib_figure.Figure(figsize=(7, 4))
  axes = figure.subplots()
  loops = run["loops"]
  for index, (loop, report) in enumerate(loops.items()):
    width = 1 + 2 * (len(loops) - 1 - index)
    history = report["history"]
    # The loss; a model with its own step and no "loss" log (a GAN): its
    # own losses.
    keys = (("loss", "val_loss") if "loss" in history
            else [key for key in history if "loss" in key])
    for key, values in history.items():
      if key not in keys:
        continue
      axes.plot(_epochs(report), values,
                "--" if key.startswith("val_") else "-", color=f"C{index}",
                label=f"{loop} {key}", marker="o", linewidth=width,
                markersize=2 + 1.5 * width)
  axes.set(ylabel="loss", title=f"{name}: every loop")
  _by_epoch(axes)
  axes.legend(fontsize=7)
  return figure


def _training_seconds(result):
  """A run's loops' training seconds (distill's: its students', and its
  teacher's)."""
  total = result.get("teacher", {}).get("wall_seconds", 0)
  for report in result["loops"].values():
    seconds = report["wall_seconds"]
    total += (sum(seconds.values()) if isinstance(seconds, dict)
              else seconds)
  return total


def _runs_section(finished, reference):
  first = finished[0][1]
  rows = [[run.name, f"`runs/{run.name}`", f"{seconds:.0f}",
           f"{_training_seconds(result):.0f}" if "loops" in result else "-"]
          for run, result, seconds in finished]
  reference_results, reference_seconds = reference
  rows.append([_SKLEARN_RUN, f"`runs/{_SKLEARN_RUN}`",
               f"{reference_seconds:.0f}",
               f"{sum(m['seconds'] for m in reference_results['models']):.0f}"])
  parts = ["## The runs",
           "Wall time: this invocation's (a resumed run's is the resume's); "
           "training: the loops' training seconds from results.json "
           f"({_SKLEARN_RUN}'s: its fits').",
           _table(["experiment", "directory", "wall time (s)",
                   "training (s)"], rows),
           "Versions: " + ", ".join(
               f"{name} {version}"
               for name, version in first["versions"].items()),
           f"Op determinism: {first.get('op_determinism')}."]
  for run, result, _ in finished:
    shown = ", ".join(f"{key}={value}" for key, value in
                      sorted(result["flags"].items()) if value is not None)
    parts.append(f"<details><summary>{run.name}: flags</summary>\n\n"
                 f"`{shown}`\n\n</details>")
  return "\n\n".join(parts)


if __name__ == "__main__":
  run_config.run_cli(Config, main)
