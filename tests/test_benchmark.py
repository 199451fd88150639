"""research.benchmark runs end to end and reports what it claims; no timing
assertions (speed belongs in the benchmark's own figures)."""

import json

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

from research import benchmark

flags.FLAGS.mark_as_parsed()


def test_flops_per_step_of_the_course_mlp_by_hand():
  x = np.zeros((1, 784), "float32")
  model = benchmark.build_model("mlp", x)
  batch = 32
  kernels = [784 * 300, 300 * 100, 100 * 10]
  forward = [2 * batch * k for k in kernels]
  # forward + weight gradients + input gradients of all but the first layer
  expected = sum(forward) * 3 - forward[0]
  assert benchmark.training_flops_per_step(model, batch) == expected


def test_benchmark_writes_the_documented_json(tmp_path, capsys):
  output = tmp_path / "benchmark.json"
  with flagsaver.flagsaver(model="mlp", batch_sizes=["8"], steps=10,
                           repeats=2, rounds=2, loops=["graph", "keras_fit"],
                           output=str(output),
                           profile_dir=str(tmp_path / "profile")):
    benchmark.main(["benchmark"])
  report = json.loads(output.read_text())
  assert report["roofline_gflops"] > 0
  variants = [(row["loop"], row["variant"]) for row in report["results"]]
  assert variants == [(loop, variant) for loop, variant, _ in
                      benchmark.VARIANTS if loop in ("graph", "keras_fit")]
  fit = next(row for row in report["results"]
             if (row["loop"], row["variant"]) == ("keras_fit", "default"))
  for row in report["results"]:
    assert set(row) >= {"loop", "variant", "batch_size", "steps_per_second",
                        "ratio_to_keras_fit", "roofline_fraction",
                        "peak_rss_mb"}
    assert row["batch_size"] == 8 and row["steps_per_second"] > 0
    rounds, fit_rounds = (row["epoch_steps_per_second"],
                          fit["epoch_steps_per_second"])
    assert [len(rates) for rates in rounds] == [2, 2]
    assert row["steps_per_second"] == pytest.approx(
        np.median(rounds))
    # Paired within a round, not the ratio of the overall medians.
    assert row["ratio_to_keras_fit"] == pytest.approx(np.median(
        [np.median(r) / np.median(f) for r, f in zip(rounds, fit_rounds)]))
    assert row["roofline_fraction"] == pytest.approx(
        row["steps_per_second"] * row["flops_per_step"]
        / (report["roofline_gflops"] * 1e9))
    assert row["peak_rss_mb"] > 100  # TensorFlow alone is larger
  assert "roofline" in capsys.readouterr().out
  traces = sorted(path.relative_to(tmp_path / "profile").parts[:2]
                  for path in (tmp_path / "profile").rglob("*.xplane.pb"))
  assert traces == sorted(("batch_8", f"{loop}_{variant}")
                          for loop, variant in variants)


def test_rounds_alternate_order_and_ratios_pair_within_a_round(monkeypatch):
  # The machine halves its speed after the first round: per-round pairing
  # cancels that, the ratio of overall medians would not.
  rates = {("graph", "steps_per_loop=epoch"): [[200.0], [90.0]],
           ("keras_fit", "default"): [[100.0], [50.0]]}
  calls = []

  def fake_measure(model_name, loop, options, x, y, batch_size, repeats,
                   seed, callbacks=()):
    calls.append((loop, options))
    round_index = sum(1 for call in calls if call[0] == loop) - 1
    variant = "default" if loop == "keras_fit" else "steps_per_loop=epoch"
    return rates[(loop, variant)][round_index], 500.0, 1e6

  monkeypatch.setattr(benchmark, "measure", fake_measure)
  monkeypatch.setattr(benchmark, "matmul_roofline_gflops", lambda: 1.0)
  monkeypatch.setattr(benchmark, "VARIANTS", (
      ("graph", "steps_per_loop=epoch", {}), ("keras_fit", "default", {})))
  report = benchmark.run_benchmark("mlp", [32], steps=10, repeats=1,
                                   rounds=2, loops=[], seed=0)
  assert [loop for loop, _ in calls] == ["graph", "keras_fit",
                                         "keras_fit", "graph"]
  graph = report["results"][0]
  assert graph["steps_per_second"] == 145.0
  assert graph["ratio_to_keras_fit"] == pytest.approx((2.0 + 1.8) / 2)
  assert graph["roofline_fraction"] == pytest.approx(145.0 * 1e6 / 1e9)


@pytest.mark.parametrize("name", benchmark.BENCHMARK_MODELS)
def test_every_benchmark_model_trains_on_its_synthetic_data(name):
  x, y = benchmark.synthetic_data(name, 16, seed=0)
  model = benchmark.build_model(name, x)
  assert model(x).shape[0] == 16 and len(y) == 16


def test_bad_benchmark_flags_are_usage_errors():
  from absl import app
  with flagsaver.flagsaver(batch_sizes=["0"]):
    with pytest.raises(app.UsageError, match="positive"):
      benchmark.main(["benchmark"])
  with flagsaver.flagsaver(rounds=1, repeats=2):
    with pytest.raises(app.UsageError, match="at least 3"):
      benchmark.main(["benchmark"])
  with flagsaver.flagsaver(loops=["turbo"]):
    with pytest.raises(app.UsageError, match="Unknown --loops"):
      benchmark.main(["benchmark"])
