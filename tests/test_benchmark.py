"""research.benchmark runs end to end and reports what it claims; no timing
assertions (speed belongs in the benchmark's own figures)."""

import json

from absl import flags
from absl.testing import flagsaver
import pytest

from research import benchmark

flags.FLAGS.mark_as_parsed()


def test_flops_per_step_of_the_course_mlp_by_hand():
  import numpy as np
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
                           repeats=3, loops=["graph", "keras_fit"],
                           output=str(output)):
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
    assert row["ratio_to_keras_fit"] == pytest.approx(
        row["steps_per_second"] / fit["steps_per_second"])
    assert row["roofline_fraction"] == pytest.approx(
        row["steps_per_second"] * row["flops_per_step"]
        / (report["roofline_gflops"] * 1e9))
    assert row["peak_rss_mb"] > 100  # TensorFlow alone is larger
  assert "roofline" in capsys.readouterr().out


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
  with flagsaver.flagsaver(loops=["turbo"]):
    with pytest.raises(app.UsageError, match="Unknown --loops"):
      benchmark.main(["benchmark"])
