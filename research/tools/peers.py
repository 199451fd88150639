"""PyTorch and JAX on the benchmark's workload, beside our loops.

The frameworks a researcher would pick instead, on the benchmark's
workload: the MLP 784-300-100-10 (ReLU, softmax cross-entropy, SGD 0.01) on
uniform [0, 1) inputs and random labels.

  torch_eager:    PyTorch, a Python loop of eager steps (beside our eager
                  loop);
  jax_jit_step:   JAX, one jit-compiled step called per batch (beside our
                  function loop);
  jax_scan_epoch: JAX, the whole epoch in one jit-compiled `lax.scan`
                  (beside our graph loop with XLA).

Neither framework is a dependency of the project: run this file with an
interpreter that has them, as research.tools.benchmark's `--peers_python` does:

    python3 -m venv ~/peers && ~/peers/bin/pip install torch==2.13.0 jax
    ~/peers/bin/python research/tools/peers.py --batch_size=32 --steps=300

It imports nothing of the project. It prints one JSON object: variant ->
steps/s of each of `--epochs` epochs after a warm-up epoch, or
`{"unavailable": reason}` for a framework that does not import and
`{"failed": error}` for one that fails.
"""

import argparse
import json
import os
import time

LAYER_SIZES = (784, 300, 100, 10)
LEARNING_RATE = 0.01


def _data(steps, batch_size, seed):
  import numpy as np
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, size=(steps, batch_size, 784)).astype("float32")
  y = rng.integers(0, 10, size=(steps, batch_size)).astype("int64")
  return x, y


def _rates(run, steps, epochs):
  run()  # warm-up: compilation, allocation
  rates = []
  for _ in range(epochs):
    start = time.perf_counter()
    run()
    rates.append(steps / (time.perf_counter() - start))
  return rates


def torch_variants(x, y, epochs, seed):
  import torch
  torch.manual_seed(seed)
  torch.set_num_threads(os.cpu_count())
  xs, ys = torch.from_numpy(x), torch.from_numpy(y)
  layers = []
  for fan_in, fan_out in zip(LAYER_SIZES, LAYER_SIZES[1:]):
    layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
  model = torch.nn.Sequential(*layers[:-1])
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
  loss_fn = torch.nn.CrossEntropyLoss()

  def run():
    for index in range(len(xs)):
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(model(xs[index]), ys[index])
      loss.backward()
      optimizer.step()
    loss.item()
  return {"torch_eager": _rates(run, len(xs), epochs)}


def jax_variants(x, y, epochs, seed):
  import jax
  import jax.numpy as jnp
  import numpy as np
  xs, ys = jnp.asarray(x), jnp.asarray(y)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(LAYER_SIZES) - 1)
  params = []
  for key, fan_in, fan_out in zip(keys, LAYER_SIZES, LAYER_SIZES[1:]):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    params.append((jax.random.uniform(key, (fan_in, fan_out),
                                      minval=-limit, maxval=limit),
                   jnp.zeros(fan_out)))

  def loss_fn(params, xb, yb):
    hidden = xb
    for index, (kernel, bias) in enumerate(params):
      hidden = hidden @ kernel + bias
      if index + 1 < len(params):
        hidden = jax.nn.relu(hidden)
    log_probs = jax.nn.log_softmax(hidden)
    return -jnp.mean(jnp.take_along_axis(log_probs, yb[:, None], 1))

  def sgd(params, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    return jax.tree_util.tree_map(lambda p, g: p - LEARNING_RATE * g,
                                  params, grads), loss

  step = jax.jit(sgd, donate_argnums=0)
  scan_epoch = jax.jit(lambda params: jax.lax.scan(sgd, params, (xs, ys)))
  state = {"step": jax.tree_util.tree_map(jnp.copy, params),
           "scan": jax.tree_util.tree_map(jnp.copy, params)}

  def run_steps():
    params = state["step"]
    for index in range(len(xs)):
      params, loss = step(params, (xs[index], ys[index]))
    loss.block_until_ready()
    state["step"] = params

  def run_scan():
    params, losses = scan_epoch(state["scan"])
    losses.block_until_ready()
    state["scan"] = params
  return {"jax_jit_step": _rates(run_steps, len(xs), epochs),
          "jax_scan_epoch": _rates(run_scan, len(xs), epochs)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  x, y = _data(args.steps, args.batch_size, args.seed)
  results = {}
  for name, variants in (("torch", torch_variants), ("jax", jax_variants)):
    try:
      results.update(variants(x, y, args.epochs, args.seed))
    except ImportError as error:
      results[name] = {"unavailable": str(error)}
    except Exception as error:  # pylint: disable=broad-except
      # One framework failing leaves the other's figures standing.
      results[name] = {"failed": f"{type(error).__name__}: {error}"}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
