"""Steps per second of every loop against model.fit and the roofline.

Against this machine's matmul roofline too.

    python -m research benchmark --model=mlp --batch_sizes=32,256 \\
        --output=benchmark.json

In one process, so ratios are fair. This VM's CPU speed drifts by tens of
percent within seconds, so variants are measured in `rounds`: each round
builds every variant afresh, trains it `1 + repeats` epochs of `steps` steps
on data already in memory (tf.data autotuning off, as
`experiment.IN_MEMORY_DATA_OPTIONS` says why) and drops the first epoch
(tracing, compilation, warm-up); the order of variants is reversed every
other round. A variant's steps/s is the median of all its measured epochs,
timed by the same `EpochRecorder` for every loop; its ratio to
`keras_fit` is the median over rounds of the ratio within a round, so a slow
or fast spell of the machine cancels out. FLOPs per step are counted from
the model's Dense kernels; the roofline is the GFLOP/s of a large float32
matmul here. `--profile_dir` adds a profiler trace of each variant
(`training_loops.ProfileEpoch`) to see where a step's time goes.

For the MLP, every round also measures the two other references of each
loop, in the same alternating order: TensorFlow's raw-op floor of its kind
(`research.tools.floor`, rows `tf_floor`), and with `--peers_python`,
PyTorch and JAX doing the same kind of work (`research.tools.peers`, rows
`peer`):

    python -m research benchmark --batch_sizes=32,256 \\
        --peers_python=$HOME/peers/bin/python
"""

import functools
import json
import os
import platform
import statistics
import subprocess
import time

from absl import app, flags
import keras
import numpy as np
import tensorflow as tf

import losses
import training_loops
from research.framework import experiment, models
from research.tools import floor

# (loop, variant, train() keyword arguments)
VARIANTS = (
    ("eager", "default", {}),
    ("function", "default", {}),
    ("graph", "steps_per_loop=epoch", {}),
    ("graph", "steps_per_loop=100", {"steps_per_loop": 100}),
    ("graph", "xla", {"jit_compile": True}),
    ("keras_fit", "default", {}),
    ("keras_fit", "steps_per_execution=100", {"steps_per_loop": 100}),
    ("keras_fit", "xla", {"jit_compile": True}),
    ("keras_fit", "steps_per_execution=100+xla",
     {"steps_per_loop": 100, "jit_compile": True}),
)
BENCHMARK_MODELS = ("mlp", "deep_net", "wide_deep", "gan")

flags.DEFINE_enum("model", "mlp", BENCHMARK_MODELS,
                  "mlp: the course's 784-300-100-10; deep_net: 20 x "
                  "Dense(100) on 784 inputs; wide_deep: on 8 features; gan: "
                  "its own train_step, two MLPs (64-256-784, 784-256-1) "
                  "with an Adam each, on images alone (batch 64 is the "
                  "usual).")
flags.DEFINE_list("batch_sizes", ["32", "256"], "Batch sizes to measure.")
flags.DEFINE_integer("steps", 300, "Steps per measured epoch.",
                     lower_bound=10)
flags.DEFINE_integer("repeats", 2, "Measured epochs per variant and round.",
                     lower_bound=1)
flags.DEFINE_integer("rounds", 5, "Rounds over all variants; steps/s is the "
                     "median of rounds x repeats epochs, at least 3.",
                     lower_bound=1)
flags.DEFINE_list("loops", [], "Only these loops (default: all variants).")
flags.DEFINE_string("output", None, "Write the results JSON here.")
flags.DEFINE_string("profile_dir", None, "Also write a TensorFlow profiler "
                    "trace of one epoch per variant under "
                    "<dir>/batch_<size>/<loop>_<variant>, for TensorBoard.")
flags.DEFINE_integer("benchmark_seed", 0, "Seed for data and weights.")
flags.DEFINE_boolean("floors", True, "With --model=mlp, also measure "
                     "TensorFlow's raw-op floor of each loop kind "
                     "(research.tools.floor) in every round.")
flags.DEFINE_string("peers_python", None, "With --model=mlp, an interpreter "
                    "with PyTorch and/or JAX: research/tools/peers.py runs in "
                    "it every round, and each loop shows its ratio to the "
                    "peer doing its kind of work. Neither is a dependency of "
                    "the project (research/tools/peers.py says how to "
                    "install them).")

FLAGS = flags.FLAGS


def synthetic_data(model_name, examples, seed):
  """In-memory features and targets shaped like the model's task."""
  rng = np.random.default_rng(seed)
  if model_name == "wide_deep":
    x = rng.normal(size=(examples, 8)).astype("float32")
    return x, (x[:, 0] - 0.5 * x[:, 3]).astype("float32")
  x = rng.uniform(0, 1, size=(examples, 784)).astype("float32")
  return x, rng.integers(0, 10, size=examples).astype("int64")


def build_model(model_name, x):
  if model_name == "mlp":
    return models.mlp_classifier(x, 10, normalize="none")
  if model_name == "deep_net":
    return models.deep_classifier(x, 10)
  if model_name == "gan":
    return models.mlp_gan(image_size=x.shape[1])
  return models.wide_deep_functional(x)


def training_flops_per_step(model, batch_size):
  """Matmul FLOPs of one training step.

  Each Dense kernel `[in, out]` costs `2 * batch * in * out` forward, the
  same again for its weight gradient, and the same again for the gradient
  with respect to its input, except the first Dense layer's, which nothing
  trainable needs. Elementwise ops are left out: a few percent here, and not
  what the matmul roofline bounds.

  A `models.GAN`'s step: the generator's forward pass on the batch's noise
  and the discriminator trained on fakes and reals (twice the batch); then
  the generator trained through the discriminator, whose forward pass and
  input gradients (all its layers', no weight gradients) the generator's
  gradient needs.
  """
  if isinstance(model, models.GAN):
    d, g = (_forward_flops(network, batch_size)
            for network in (model.discriminator, model.generator))
    d_step = sum(g) + 2 * (3 * sum(d) - d[0])
    g_step = 2 * sum(d) + 3 * sum(g) - g[0]
    return d_step + g_step
  forward = _forward_flops(model, batch_size)
  return 3 * sum(forward) - (forward[0] if forward else 0)


def _forward_flops(model, batch_size):
  """Each Dense kernel's forward FLOPs on `batch_size` examples, in
  order."""
  dense = [layer for layer in model._flatten_layers()
           if getattr(layer, "kernel", None) is not None]
  return [2 * batch_size * int(np.prod(layer.kernel.shape))
          for layer in dense]


def matmul_roofline_gflops(size=2048, chain=4, repeats=5):
  """The best GFLOP/s of `chain` float32 `size` x `size` matmuls in one
  `tf.function` call, over `repeats` calls: what this machine's matmul
  kernel sustains, the ceiling for a Dense-only model."""
  a = tf.random.stateless_normal([size, size], seed=[0, 1])
  b = tf.random.stateless_normal([size, size], seed=[0, 2]) / size

  @tf.function
  def chained(a, b):
    for _ in range(chain):
      a = tf.matmul(a, b)
    return tf.reduce_sum(a)

  chained(a, b).numpy()  # warm-up
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    chained(a, b).numpy()
    rates.append(chain * 2 * size**3 / (time.perf_counter() - start) / 1e9)
  return max(rates)


class PeakMemory:
  """Peak resident memory over a block, in MiB (Linux: the kernel's
  high-water mark, reset through /proc/self/clear_refs)."""

  def __enter__(self):
    try:
      with open("/proc/self/clear_refs", "w", encoding="ascii") as stream:
        stream.write("5")
    except OSError:
      pass  # not Linux: the process-lifetime peak is reported instead
    return self

  def __exit__(self, *exc_info):
    self.peak_mb = _vm_hwm_mb()


def _vm_hwm_mb():
  try:
    with open("/proc/self/status", encoding="ascii") as stream:
      for line in stream:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model_name, loop, options, x, y, batch_size, repeats, seed,
            callbacks=()):
  """Steps/s of `repeats` epochs over `x, y` after a warm-up epoch, peak RSS,
  and FLOPs per step."""
  keras.utils.set_random_seed(seed)
  # A model with its own step (the GAN) takes images alone, its optimizers
  # and loss compiled in.
  own_step = model_name == "gan"
  data = tf.data.Dataset.from_tensor_slices(x if own_step else (x, y)).batch(
      batch_size, drop_remainder=True).cache().with_options(
          experiment.IN_MEMORY_DATA_OPTIONS)
  supervised = {} if own_step else {
      "optimizer_fn": lambda: keras.optimizers.SGD(0.01),
      "loss": (losses.MeanSquaredError() if model_name == "wide_deep"
               else losses.SparseCategoricalCrossentropy())}
  with PeakMemory() as memory:
    history = training_loops.train(
        lambda: build_model(model_name, x), train_data=data, loop=loop,
        epochs=1 + repeats, seed=seed, verbose=0, callbacks=callbacks,
        **supervised, **options)
  return (history.steps_per_second[1:], memory.peak_mb,
          training_flops_per_step(history.model, batch_size))


# The raw-op floor and the peer doing the same kind of work as each of our
# variants: `research.tools.floor`'s kinds, `research.tools.peers`' variants.
REFERENCES = {
    ("eager", "default"): ("eager", "torch_eager"),
    ("function", "default"): ("function", "jax_jit_step"),
    ("graph", "steps_per_loop=epoch"): ("graph", None),
    ("graph", "steps_per_loop=100"): ("graph", None),
    ("graph", "xla"): ("graph_xla", "jax_scan_epoch"),
}
PEERS = ("torch_eager", "jax_jit_step", "jax_scan_epoch")
FLOOR_LOOP, PEER_LOOP = "tf_floor", "peer"
PEERS_SCRIPT = os.path.join(os.path.dirname(__file__), "peers.py")


class PeersError(RuntimeError):
  """The peers' interpreter failed or printed no results."""


def measure_peers(peers_python, batch_size, steps, repeats, seed):
  """`{variant: epoch rates}` of `research.tools.peers` run by
  `peers_python` (an interpreter with PyTorch and/or JAX), the frameworks
  that failed to import left out."""
  command = [peers_python, PEERS_SCRIPT, f"--batch_size={batch_size}",
             f"--steps={steps}", f"--epochs={repeats}", f"--seed={seed}"]
  try:
    finished = subprocess.run(command, capture_output=True, text=True,
                              check=True)
    results = json.loads(finished.stdout.strip().splitlines()[-1])
  except (OSError, subprocess.CalledProcessError, ValueError,
          IndexError) as error:
    detail = (getattr(error, "stderr", "") or str(error)).strip()
    raise PeersError(f"--peers_python {peers_python} could not run "
                     f"research/tools/peers.py: "
                     f"{detail.splitlines()[-1] if detail else error}"
                     ) from None
  return {name: rates for name, rates in results.items()
          if name in PEERS}


def _jobs(model_name, variants, floors, peers_python, x, y, batch_size,
          repeats, seed):
  """What one round measures: callables, each returning `{row key: (epoch
  rates, peak MiB or None, FLOPs per step)}`."""
  def ours(loop, variant, options):
    rates, peak_mb, flops = measure(model_name, loop, options, x, y,
                                    batch_size, repeats, seed)
    return {(loop, variant): (rates, peak_mb, flops)}

  # The floors and peers train the same network as the MLP of ours.
  flops = (training_flops_per_step(build_model(model_name, x[:1]),
                                   batch_size)
           if floors or peers_python else None)

  def floor_of(kind):
    with PeakMemory() as memory:
      rates = floor.measure(kind, x, y, batch_size, repeats, seed)
    return {(FLOOR_LOOP, kind): (rates, memory.peak_mb, flops)}

  def peers():
    return {(PEER_LOOP, name): (rates, None, flops)
            for name, rates in measure_peers(
                peers_python, batch_size, len(x) // batch_size, repeats,
                seed).items()}
  return ([functools.partial(ours, *variant) for variant in variants]
          + [functools.partial(floor_of, kind) for kind in floors]
          + ([peers] if peers_python else []))


def run_benchmark(model_name, batch_sizes, steps, repeats, rounds, loops,
                  seed, profile_dir=None, floors=True, peers_python=None):
  """The report `main` prints and writes; with `profile_dir`, also a
  profiler trace of one epoch of each variant, from an extra run after the
  timed rounds, so the profiler's overhead is in no reported rate.

  With `floors` (the MLP only), each round also measures
  `research.tools.floor`'s raw-op loops, and with `peers_python`,
  `research.tools.peers` in that interpreter; each of our variants then gets
  its ratio to the floor and the peer of its kind (`REFERENCES`), paired
  within rounds as the ratio to fit.
  """
  roofline = matmul_roofline_gflops()
  variants = [variant for variant in VARIANTS
              if not loops or variant[0] in loops]
  floor_kinds = floor.KINDS if floors and model_name == "mlp" else ()
  peers_python = peers_python if model_name == "mlp" else None
  results = []
  for batch_size in batch_sizes:
    x, y = synthetic_data(model_name, steps * batch_size, seed)
    rows = {}
    jobs = _jobs(model_name, variants, floor_kinds, peers_python, x, y,
                 batch_size, repeats, seed)
    for round_index in range(rounds):
      for job in (jobs if round_index % 2 == 0 else jobs[::-1]):
        for (loop, variant), (rates, peak_mb, flops) in job().items():
          row = rows.setdefault((loop, variant), {
              "loop": loop, "variant": variant, "batch_size": batch_size,
              "epoch_steps_per_second": [], "peak_rss_mb": peak_mb,
              "flops_per_step": flops})
          row["epoch_steps_per_second"].append(rates)
          if peak_mb is not None:
            row["peak_rss_mb"] = max(row["peak_rss_mb"], peak_mb)
    if profile_dir:
      for loop, variant, options in variants:
        trace_dir = os.path.join(profile_dir, f"batch_{batch_size}",
                                 f"{loop}_{variant}")
        measure(model_name, loop, options, x, y, batch_size, 1, seed,
                [training_loops.ProfileEpoch(trace_dir)])
    fit = rows.get(("keras_fit", "default"))
    for key, row in rows.items():
      row["steps_per_second"] = statistics.median(
          sum(row["epoch_steps_per_second"], []))
      row["roofline_fraction"] = (row["steps_per_second"]
                                  * row["flops_per_step"] / (roofline * 1e9))
      row["ratio_to_keras_fit"] = _ratio(row, fit)
      floor_kind, peer = REFERENCES.get(key, (None, None))
      row["floor"] = floor_kind if (FLOOR_LOOP, floor_kind) in rows else None
      row["ratio_to_floor"] = _ratio(row, rows.get((FLOOR_LOOP, floor_kind)))
      row["peer"] = peer if (PEER_LOOP, peer) in rows else None
      row["ratio_to_peer"] = _ratio(row, rows.get((PEER_LOOP, peer)))
    results += rows.values()
  return {"model": model_name, "roofline_gflops": roofline,
          "machine": machine(), "steps": steps, "repeats": repeats,
          "rounds": rounds, "seed": seed, "versions": experiment.versions(),
          "peers_python": peers_python, "results": results}


def _ratio(row, reference):
  if reference is None:
    return None
  return paired_ratio(row["epoch_steps_per_second"],
                      reference["epoch_steps_per_second"])


def paired_ratio(rounds, reference_rounds):
  """The median over rounds of the ratio of two variants' median steps/s in
  the same round (`rounds`: one list of epoch rates per round)."""
  if len(rounds) != len(reference_rounds):
    raise ValueError(f"Cannot pair {len(rounds)} rounds with "
                     f"{len(reference_rounds)}.")
  return statistics.median(
      statistics.median(rates) / statistics.median(reference)
      for rates, reference in zip(rounds, reference_rounds))


def machine():
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(),
          "tensorflow_threads": {
              "intra_op":
                  tf.config.threading.get_intra_op_parallelism_threads(),
              "inter_op":
                  tf.config.threading.get_inter_op_parallelism_threads()}}


def format_table(report):
  lines = [f"{report['model']}: matmul roofline "
           f"{report['roofline_gflops']:.1f} GFLOP/s on "
           f"{report['machine']['cpu_count']} cores",
           f"{'batch':>5}  {'loop':<9}  {'variant':<28}  {'steps/s':>8}  "
           f"{'vs fit':>6}  {'vs floor':>20}  {'vs peer':>22}  "
           f"{'roofline':>8}  {'peak MiB':>8}"]
  for row in report["results"]:
    peak = row["peak_rss_mb"]
    lines.append(
        f"{row['batch_size']:>5}  {row['loop']:<9}  {row['variant']:<28}  "
        f"{row['steps_per_second']:>8.0f}  "
        f"{_times(row['ratio_to_keras_fit']):>6}  "
        f"{_times(row.get('ratio_to_floor'), row.get('floor')):>20}  "
        f"{_times(row.get('ratio_to_peer'), row.get('peer')):>22}  "
        f"{row['roofline_fraction']:>8.1%}  "
        f"{'-' if peak is None else f'{peak:.0f}':>8}")
  return "\n".join(lines)


def _times(ratio, reference=None):
  if ratio is None:
    return "-"
  return f"{ratio:.2f}x" + (f" {reference}" if reference else "")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    batch_sizes = [int(size) for size in FLAGS.batch_sizes]
  except ValueError:
    raise app.UsageError(f"--batch_sizes must be integers, got "
                         f"{FLAGS.batch_sizes}.") from None
  if any(size < 1 for size in batch_sizes):
    raise app.UsageError("--batch_sizes must be positive.")
  if FLAGS.rounds * FLAGS.repeats < 3:
    raise app.UsageError("--rounds x --repeats must be at least 3 measured "
                         "epochs for a median.")
  unknown = set(FLAGS.loops) - set(training_loops.LOOPS)
  if unknown:
    raise app.UsageError(f"Unknown --loops {sorted(unknown)}; expected "
                         f"{', '.join(training_loops.LOOPS)}.")
  try:
    report = run_benchmark(FLAGS.model, batch_sizes, FLAGS.steps,
                           FLAGS.repeats, FLAGS.rounds, FLAGS.loops,
                           FLAGS.benchmark_seed, FLAGS.profile_dir,
                           floors=FLAGS.floors,
                           peers_python=FLAGS.peers_python)
  except PeersError as error:
    raise app.UsageError(str(error)) from None
  print(format_table(report))
  if FLAGS.output:
    training_loops.write_json_atomically(FLAGS.output, report, indent=2)


if __name__ == "__main__":
  app.run(main)
