"""research.tools.report end to end with --quick on a small data directory the
test writes in ../shared/data's layout (CI has no real data)."""

import dataclasses
import json
import os
import re
import warnings

import numpy as np
import pytest
from sklearn import exceptions, neural_network

import training_loops
from conftest import write_california_csv, write_idx
from research.framework import datasets
from research.tools import report, sklearn_reference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _digits(rng, count):
  """Learnable 28x28 "digits": class k inks row band k, over noise."""
  labels = np.arange(count) % 10
  images = rng.integers(0, 40, (count, 28, 28))
  for image, label in zip(images, labels):
    image[2 + 2 * label:4 + 2 * label] = 255
  return images, labels


def _write_data(directory):
  rng = np.random.default_rng(0)
  mnist = directory / "mnist"
  mnist.mkdir(parents=True)
  for prefix, count in (("train", 200), ("t10k", 50)):
    images, labels = _digits(rng, count)
    write_idx(mnist / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(mnist / f"{prefix}-labels-idx1-ubyte.gz", labels)
  write_california_csv(directory / "california-housing", rng, rows=300,
                       noise=20000)


def _results(output_dir, name):
  with open(output_dir / "runs" / name / "results.json",
            encoding="utf-8") as stream:
    return json.load(stream)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  _write_data(data_dir)
  output_dir = tmp_path_factory.mktemp("report")
  # The tiniest quick run: one epoch of one batch of each split.
  report.main(report.Config(quick=True, epochs=1, limit_batches=1,
                            data_dir=str(data_dir),
                            output_dir=str(output_dir), verbose=0))
  return output_dir, (output_dir / "REPORT.md").read_text(encoding="utf-8")


def test_quick_report_cites_its_anchors(quick_report):
  _, text = quick_report
  assert "LeCun, Bottou, Bengio and Haffner (1998)" in text
  assert "Gradient-based learning applied to document recognition" in text
  for row in ("| LeCun et al. (1998): 3-layer NN, 300+100 hidden units | "
              "3.05% |",
              "| LeCun et al. (1998): 3-layer NN, 500+150 hidden units | "
              "2.95% |",
              "| LeCun et al. (1998): 3-layer NN, 300+100 hidden units, "
              "distortions | 2.50% |",
              "| LeCun et al. (1998): 2-layer NN, 300 hidden units | "
              "4.70% |"):
    assert row in text
  # No figure the report did not compute stands among its measurements.
  assert "anchor:" not in text and "goal for the course net" not in text
  assert not re.search(r"issue ?[0-9]|#[0-9]", text, re.IGNORECASE)


def _table_rows(text, first_cell):
  """The cells of the Markdown table rows whose first cell starts with
  `first_cell`."""
  return [[cell.strip() for cell in line.strip().strip("|").split("|")]
          for line in text.splitlines()
          if line.startswith(f"| {first_cell}")]


def test_sklearn_reference_is_fitted_on_regress_split(quick_report):
  output_dir, text = quick_report
  regress = _results(output_dir, "regress")
  recorded = _results(output_dir, "sklearn_reference")
  assert recorded["settings"]["max_iter"] == sklearn_reference.QUICK_MAX_ITER
  # Fitted here, independently: regress's split, z-scored by hand.
  splits = datasets.load("california_housing", regress["flags"]["data_dir"],
                         regress["seed"])
  assert recorded["data"] == regress["data"] == splits.sizes
  mean = splits.x_train.mean(axis=0, dtype=np.float64)
  std = splits.x_train.std(axis=0, dtype=np.float64)
  def scaled(x):
    return ((x - mean) / std).astype("float32")
  rows = _table_rows(text, "scikit-learn MLPRegressor (computed in this run)")
  assert [row[0] for row in rows] == [
      "scikit-learn MLPRegressor (computed in this run): one hidden layer "
      "of 30",
      "scikit-learn MLPRegressor (computed in this run): three hidden "
      "layers of 100"]
  for row, sizes in zip(rows, ((30,), (100, 100, 100))):
    # Its own table: a figure and its fit, not one column per loop.
    assert len(row) == 4
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
      model = neural_network.MLPRegressor(
          hidden_layer_sizes=sizes, random_state=regress["seed"],
          max_iter=sklearn_reference.QUICK_MAX_ITER).fit(
              scaled(splits.x_train), splits.y_train)
    mse = np.mean((model.predict(scaled(splits.x_test)) - splits.y_test) ** 2)
    assert float(row[1]) == pytest.approx(mse, abs=2e-4)
    assert int(row[2]) == model.n_iter_
    # The section's sentence quotes the same figures.
    assert f"{row[1]} with {row[0].split(': ')[1]}" in text
  assert (f"**Quick run**: at most {sklearn_reference.QUICK_MAX_ITER} "
          "iterations") in text


def test_gradient_norm_sentence_follows_the_table(quick_report):
  _, text = quick_report
  section = text[text.index("## 2. Vanishing gradients"):
                 text.index("## 3. ")]
  rows = _table_rows(section, "deep_net_")
  assert len(rows) == 5
  larger = [row[0] for row in rows if float(row[2]) > float(row[3])]
  smaller = [row[0] for row in rows if float(row[2]) < float(row[3])]
  counted = re.search(r"larger at the input \(layer 1\) than at the output "
                      r"\(the last hidden layer\) in (\d+) of (\d+) runs"
                      r"(?: \(([^)]*)\))? and smaller in (\d+)"
                      r"(?: \(([^)]*)\))?", section)
  assert counted, "the gradient-norm sentence is missing"
  assert int(counted[1]) == len(larger) and int(counted[2]) == 5
  assert (counted[3] or "").split(", ") == (larger or [""])
  assert int(counted[4]) == len(smaller)
  assert (counted[5] or "").split(", ") == (smaller or [""])
  assert "shrink towards the input, the first layers barely learn" not in text


def test_gradient_norm_comparison_counts_each_way():
  assert report.gradient_norm_comparison(
      {"a": (2e-3, 1e-3), "b": (1e-3, 2e-3), "c": (3e-3, 1e-4)}) == (
          "In the table, the norm is larger at the input (layer 1) than at "
          "the output (the last hidden layer) in 2 of 3 runs (a, c) and "
          "smaller in 1 (b).")
  assert report.gradient_norm_comparison(
      {"a": (1e-3, 2e-3), "b": (1e-3, 1e-3)}) == (
          "In the table, the norm is larger at the input (layer 1) than at "
          "the output (the last hidden layer) in 0 of 2 runs, smaller in 1 "
          "(a) and equal in 1 (b).")


def test_quick_report_names_every_experiment_and_loop(quick_report):
  output_dir, text = quick_report
  for name in ("classify_none", "classify_zscore", "classify_minmax",
               "deep_net_relu", "deep_net_selu", "deep_net_batchnorm",
               "deep_net_dropout", "deep_net_alpha_dropout", "early_stopping",
               "regress", "wide_deep_functional", "wide_deep_subclassed",
               "wide_deep_multi_input", "hparam_search", "vae", "gan",
               "wgan_gp", "distill"):
    assert name in text
    assert os.path.isfile(output_dir / "runs" / name / "results.json")
  for loop in training_loops.LOOPS:
    assert loop in text


def test_every_picture_exists_as_a_png(quick_report):
  output_dir, text = quick_report
  pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  # normalization, confusion matrix, gradient norms, the VAE's samples
  # and reconstructions, each GAN's last grid and scores per epoch, one
  # overlay a run with loops (all but hparam_search; distill's two
  # students).
  assert len(pictures) == 3 + 2 + 2 * 2 + 18
  for picture in pictures:
    assert not os.path.isabs(picture)
    content = (output_dir / picture).read_bytes()
    assert content.startswith(PNG_MAGIC) and len(content) > 1000


def test_tables_hold_the_runs_results(quick_report):
  output_dir, text = quick_report
  for normalize in ("none", "zscore", "minmax"):
    loops = _results(output_dir, f"classify_{normalize}")["loops"]
    assert loops.keys() == set(training_loops.LOOPS)
    errors = [f"{100 * (1 - loops[loop]['test']['accuracy']):.2f}%"
              for loop in loops]
    assert f"| {normalize} | {' | '.join(errors)} |" in text
  for name in ("regress", "wide_deep_functional", "wide_deep_subclassed",
               "wide_deep_multi_input"):
    loops = _results(output_dir, name)["loops"]
    mses = [f"{loops[loop]['test']['loss']:.4f}" for loop in loops]
    assert f"| {name} | {' | '.join(mses)} |" in text
  search = _results(output_dir, "hparam_search")["random_search"]
  assert search["best_params"]
  assert f"{search['test_mse']:.4f}" in text
  for loop, run in _results(output_dir, "early_stopping")["loops"].items():
    assert f"| {loop} | {run['epochs_run']} | " in text
  relu = _results(output_dir, "deep_net_relu")
  first = np.mean(next(iter(relu["gradient_norms"].values())))
  assert f"| deep_net_relu | relu | {first:.2e} |" in text
  assert _results(output_dir, "classify_minmax")["versions"][
      "tensorflow"] in text
  for loop, run in _results(output_dir, "vae")["loops"].items():
    test = run["test"]
    assert (f"| ours: {loop} loop | {test['nll']:.2f} | "
            f"{test['neg_elbo']:.2f} | {test['reconstruction']:.2f} | "
            f"{test['kl']:.2f} |") in text
  assert "| Burda et al. (2016), Table 1: VAE, one stochastic layer, k=1 " \
         "| 86.76 |" in text
  # --quick's own settings for these scripts.
  assert _results(output_dir, "vae")["flags"]["nll_samples"] == 100
  assert _results(output_dir, "distill")["flags"]["teacher_epochs"] is None
  teacher = _results(output_dir, "distill/teacher")["loops"]["graph"]
  assert teacher["epochs"] == [0]  # --epochs=1, as the students
  for objective in ("gan", "wgan_gp"):
    results = _results(output_dir, objective)
    assert results["flags"]["score_samples"] == 1000
    # Judged by the report's own classifier, which it exported.
    judge = output_dir / "runs" / "classify_minmax" / "export" / "graph.keras"
    assert results["judge"]["path"] == str(judge) and judge.is_file()
    for loop, run in results["loops"].items():
      test = run["test"]
      assert (f"| ours: {objective}, {loop} loop | "
              f"{test['inception_score']:.2f} | {test['fid']:.2f} |") in text
  # The recipes sample from the averaged generator, and the report says so.
  assert ("sampled from a moving average of the generator's weights (decay "
          "0.999)") in text
  for loop, run in _results(output_dir, "distill")["loops"].items():
    test = run["test"]
    assert (f"| ours: {loop} loop | {test['teacher_errors']} | "
            f"{test['student_alone_errors']} | "
            f"{test['student_distilled_errors']} |") in text
  assert "| Hinton et al. (2015), section 3 | 67 | 146 | 74 | 91% |" in text


def _refusal(data_dir, output_dir, **settings):
  """The report's exit line for `data_dir`, with nothing written."""
  with pytest.raises(SystemExit) as raised:
    report.main(report.Config(quick=True, data_dir=str(data_dir),
                              output_dir=str(output_dir), **settings))
  assert not os.path.exists(output_dir)
  message = str(raised.value.code)
  assert "\n" not in message
  return message


def test_a_runs_own_setting_on_the_reports_command_line_is_refused(
    tmp_path):
  _write_data(tmp_path / "data")
  assert _refusal(tmp_path / "data", tmp_path / "out",
                  dataset="mnist").startswith(
                      "error: --dataset and --export_dir are set by the "
                      "report for each run")


def test_every_run_takes_the_shared_settings_changed_on_the_command_line(
    quick_report):
  output_dir, _ = quick_report
  runs = [path for path in (output_dir / "runs").glob("*/results.json")
          if path.parent.name != "sklearn_reference"]
  assert len(runs) == len(report.RUNS)
  for results in runs:
    flags = json.loads(results.read_text())["flags"]
    assert (flags["epochs"], flags["limit_batches"], flags["verbose"],
            flags["seed"]) == (1, 1, 0, 42), results


def test_a_missing_data_dir_is_one_line(tmp_path):
  assert _refusal(tmp_path / "absent", tmp_path / "out").startswith(
      "error: --data_dir")


def test_a_missing_file_is_one_line_before_anything_runs(tmp_path):
  _write_data(tmp_path / "data")
  os.remove(tmp_path / "data" / "california-housing" / "cal_housing.csv")
  message = _refusal(tmp_path / "data", tmp_path / "out")
  assert message.startswith("error: ")
  assert "cal_housing.csv" in message


@pytest.mark.parametrize("given,line", [
    # Refused by the experiment's config, and by its own checks.
    ({"discriminator_dropout": 1.5}, "error: --discriminator_dropout=1.5 is "
                                     "out of range; accepted: >= 0 and < 1."),
    ({"dataset": "diabetes"}, "error: --dataset=diabetes is not an image "
                              "dataset"),
])
def test_a_runs_bad_setting_is_one_line_before_anything_runs(
    tmp_path, monkeypatch, given, line):
  _write_data(tmp_path / "data")
  gan_run = next(run for run in report.RUNS if run.name == "gan")
  monkeypatch.setattr(report, "RUNS", (*report.RUNS, dataclasses.replace(
      gan_run, name="bad_gan", given={**gan_run.given, **given})))
  assert _refusal(tmp_path / "data", tmp_path / "out").startswith(line)
