"""research.tools.benchmark runs end to end and reports what it claims; no
timing assertions (speed belongs in the benchmark's own figures)."""

import importlib.util
import json

from absl import flags
from absl.testing import flagsaver
import keras
import numpy as np
import pytest

from research.tools import benchmark

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
                           output=str(output), floors=False,
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
                                   rounds=2, loops=[], seed=0, floors=False)
  assert [loop for loop, _ in calls] == ["graph", "keras_fit",
                                         "keras_fit", "graph"]
  graph = report["results"][0]
  assert graph["steps_per_second"] == 145.0
  assert graph["ratio_to_keras_fit"] == pytest.approx((2.0 + 1.8) / 2)
  assert graph["roofline_fraction"] == pytest.approx(145.0 * 1e6 / 1e9)


def test_floors_and_peers_are_rows_measured_in_the_same_rounds(monkeypatch):
  """Each loop's ratio to its floor and peer pairs rates within a round, as
  its ratio to fit does; the floors and peers join the alternating order."""
  order = []
  # Round 2 runs at half speed for everyone.
  speed = lambda: 1.0 if len(order) <= 7 else 0.5

  def fake_measure(model_name, loop, options, x, y, batch_size, repeats,
                   seed, callbacks=()):
    order.append(loop)
    return [{"eager": 100.0, "keras_fit": 400.0}[loop] * speed()], 500.0, 1e6

  def fake_floor(kind, x, y, batch_size, repeats, seed):
    order.append(f"floor {kind}")
    return [{"eager": 200.0}.get(kind, 1000.0) * speed()]

  def fake_peers(python, batch_size, steps, repeats, seed):
    order.append("peers")
    assert (python, steps) == ("/peers/python", 10)
    return {"torch_eager": [1000.0 * speed()],
            "jax_jit_step": [2000.0 * speed()]}

  monkeypatch.setattr(benchmark, "measure", fake_measure)
  monkeypatch.setattr(benchmark.floor, "measure", fake_floor)
  monkeypatch.setattr(benchmark, "measure_peers", fake_peers)
  monkeypatch.setattr(benchmark, "matmul_roofline_gflops", lambda: 1.0)
  monkeypatch.setattr(benchmark, "VARIANTS", (
      ("eager", "default", {}), ("keras_fit", "default", {})))
  report = benchmark.run_benchmark("mlp", [32], steps=10, repeats=1,
                                   rounds=2, loops=[], seed=0,
                                   peers_python="/peers/python")
  floors = [f"floor {kind}" for kind in benchmark.floor.KINDS]
  first = ["eager", "keras_fit", *floors, "peers"]
  assert order == first + first[::-1]
  rows = {(row["loop"], row["variant"]): row for row in report["results"]}
  assert sorted(rows) == sorted(
      [("eager", "default"), ("keras_fit", "default")]
      + [("tf_floor", kind) for kind in benchmark.floor.KINDS]
      + [("peer", "torch_eager"), ("peer", "jax_jit_step")])
  eager = rows[("eager", "default")]
  assert (eager["floor"], eager["peer"]) == ("eager", "torch_eager")
  assert eager["ratio_to_floor"] == pytest.approx(0.5)
  assert eager["ratio_to_peer"] == pytest.approx(0.1)
  assert eager["ratio_to_keras_fit"] == pytest.approx(0.25)
  fit = rows[("keras_fit", "default")]
  assert fit["ratio_to_floor"] is None and fit["peer"] is None
  assert rows[("peer", "torch_eager")]["peak_rss_mb"] is None
  table = benchmark.format_table(report)
  assert "0.50x eager" in table and "0.10x torch_eager" in table


def test_peers_script_runs_without_the_project_and_reports_what_imports():
  """research/tools/peers.py, run by an interpreter without PyTorch or JAX (this
  one has neither), names what is missing; the benchmark then shows no peer
  rows. A missing interpreter is one line."""
  import subprocess
  import sys
  for framework in ("torch", "jax"):
    if importlib.util.find_spec(framework):
      pytest.skip(f"{framework} is installed here")
  done = subprocess.run([sys.executable, benchmark.PEERS_SCRIPT,
                         "--steps=3", "--batch_size=2"],
                        capture_output=True, text=True, check=True,
                        cwd="/")
  results = json.loads(done.stdout)
  assert set(results) == {"torch", "jax"}
  assert all("unavailable" in value for value in results.values())
  assert benchmark.measure_peers(sys.executable, 2, 3, 1, 0) == {}
  with pytest.raises(benchmark.PeersError,
                     match="--peers_python /no/python could not run"):
    benchmark.measure_peers("/no/python", 2, 3, 1, 0)


def test_every_floor_kind_trains_the_same_network_the_same_way():
  """The four raw-op loops are one step driven four ways: after an epoch
  from the same initialization, the same weights; the first step's loss is
  NumPy's softmax cross-entropy of the initial weights."""
  x, y = benchmark.synthetic_data("mlp", 4 * 8, seed=0)
  weights = {}
  for kind in benchmark.floor.KINDS:
    model = benchmark.floor.RawMLP(seed=3)
    initial = [v.numpy() for v in model.variables]
    if kind == "eager":
      first_loss = float(model.step(x[:8], y[:8]))
      model = benchmark.floor.RawMLP(seed=3)
    assert benchmark.floor.epoch_runner(kind, model, x, y, 8)() == 4
    weights[kind] = [v.numpy() for v in model.variables]
  hidden = x[:8]
  for index in range(0, 6, 2):
    hidden = hidden @ initial[index] + initial[index + 1]
    if index < 4:
      hidden = np.maximum(hidden, 0)
  log_probs = hidden - np.log(np.exp(hidden).sum(-1, keepdims=True))
  assert first_loss == pytest.approx(-log_probs[np.arange(8), y[:8]].mean(),
                                     rel=1e-5)
  for kind in benchmark.floor.KINDS[1:]:
    for ours, eager in zip(weights[kind], weights["eager"]):
      np.testing.assert_allclose(ours, eager, rtol=1e-4, atol=1e-6)
  assert not np.allclose(weights["eager"][0], initial[0])


class _FinalWeights(keras.callbacks.Callback):

  def on_train_end(self, logs=None):
    self.weights = self.model.get_weights()


@pytest.mark.parametrize("name", benchmark.BENCHMARK_MODELS)
def test_every_benchmark_model_trains_on_its_synthetic_data_as_fit(name):
  """The measured workload is training: the graph loop moves the weights
  from their start to where model.fit takes them on the same data."""
  x, y = benchmark.synthetic_data(name, 16, seed=0)
  keras.utils.set_random_seed(0)  # measure's seed: the initial weights
  initial = benchmark.build_model(name, x).get_weights()
  final = {}
  for loop in ("graph", "keras_fit"):
    kept = _FinalWeights()
    rates, _, flops = benchmark.measure(name, loop, {}, x, y, 8, 1, 0,
                                        callbacks=[kept])
    assert len(rates) == 1 and rates[0] > 0 and flops > 0
    final[loop] = kept.weights
  assert any(not np.allclose(start, end)
             for start, end in zip(initial, final["graph"]))
  for ours, fit in zip(final["graph"], final["keras_fit"]):
    np.testing.assert_allclose(ours, fit, rtol=1e-5, atol=1e-6)


def test_flops_per_step_of_the_gan_by_hand():
  """Discriminator 784-256-1, generator 64-256-784, batch 64: the
  discriminator's step (generator forward on 64; discriminator forward,
  weight and input gradients but its first layer's on 128) and the
  generator's (both forward on 64, the discriminator's input gradients,
  the generator's weight and input gradients but its first layer's)."""
  x, _ = benchmark.synthetic_data("gan", 1, seed=0)
  model = benchmark.build_model("gan", x)
  d = [2 * 64 * 784 * 256, 2 * 64 * 256 * 1]
  g = [2 * 64 * 64 * 256, 2 * 64 * 256 * 784]
  d_step = sum(g) + 2 * sum(d) * 3 - 2 * d[0]
  g_step = sum(g) + sum(d) + sum(d) + 2 * sum(g) - g[0]
  assert benchmark.training_flops_per_step(model, 64) == d_step + g_step


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
