"""`tf.distribute` strategies by name, including several replicas on one CPU."""

import json
import os

import keras
import numpy as np
import tensorflow as tf

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")


# What a collective op raises when a peer worker dies or freezes (aborted:
# TensorFlow's coordination service saw a peer stop sending heartbeats).
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                 tf.errors.AbortedError, tf.errors.CancelledError)


class WorkerLostError(RuntimeError):
  """A multi-worker run lost contact with a peer worker."""

  def __init__(self, epoch, error):
    where = "" if epoch is None else f" in epoch {epoch} (0-based)"
    super().__init__(
        f"A peer worker stopped responding{where} ({type(error).__name__}); "
        "this worker stops too. Restart every worker with the same "
        "checkpoint_dir to resume from the last checkpoint.")
    self.epoch = epoch


class CollectiveMismatchError(RuntimeError):
  """The replicas' collective ops did not match: two strategies on the same
  devices in one process (each numbers its collectives from the same keys,
  so one's ops meet the other's), or workers whose models differ."""

  def __init__(self, epoch, error):
    where = "" if epoch is None else f" in epoch {epoch} (0-based)"
    # "Shape mismatch in the collective instance 100. Op at device ..."
    cause = error.message.split("aborted by: ")[-1].split(".")[0]
    super().__init__(
        f"The replicas' collective ops did not match{where} ({cause}): "
        f"two tf.distribute strategies on the same devices in this process "
        f"(build one per set of devices and reuse it, as make_strategy "
        f"does), or workers training different models.")
    self.epoch = epoch


def collectives_mismatched(error):
  """Whether a TensorFlow `error` is a collective op aborted because the
  replicas' ops did not match (`CollectiveMismatchError`)."""
  return "Collective ops is aborted by: Shape mismatch" in error.message


class PeerRefusedError(RuntimeError):
  """Another worker of a multi-worker run refused to start it (`first_refusal`):
  this one stops with that worker's reason."""

  def __init__(self, worker, reason):
    who = "the chief" if worker == 0 else f"worker {worker}"
    super().__init__(f"{who} refused the run: {reason}")
    self.worker, self.reason = worker, reason


# The longest refusal `first_refusal` passes on, in UTF-8 bytes.
_REFUSAL_BYTES = 1024


def first_refusal(strategy, reason):
  """Every worker of a multi-worker run learns whether one refused to start
  it, and why: a refusal only one worker can see (the chief's lock, its
  run_config.json) would otherwise leave the others waiting in a
  collective for a peer that left, and stopping with "A peer worker
  stopped responding" instead of the reason.

  A collective: every worker calls it, with `reason` its own one-line
  refusal or None. Returns `(worker index, reason)` of the first worker
  that refused (the chief first), or None.
  """
  encoded = np.frombuffer((reason or "").encode("utf-8")[:_REFUSAL_BYTES],
                          np.uint8)
  row = np.zeros([1, _REFUSAL_BYTES], np.int32)
  row[0, :len(encoded)] = encoded
  found = strategy.gather(
      strategy.experimental_distribute_values_from_function(
          lambda _: tf.constant(row)), axis=0).numpy()
  # Gathered by replica, the workers' in order: as many replicas each as
  # this one has (a "chief" task in TF_CONFIG is one of them).
  per_worker = len(strategy.extended.worker_devices)
  for replica, codes in enumerate(found):
    if codes.any():
      text = bytes(codes[codes > 0].astype(np.uint8)).decode("utf-8",
                                                             "replace")
      return replica // per_worker, text
  return None


# A collective that waits longer than this for a peer fails instead of
# hanging: long enough for a slow step, short enough to notice a frozen peer.
COLLECTIVE_TIMEOUT_SECONDS = 300.0


def fit_builds_symbolically(model, strategy):
  """Whether `model.fit` builds `model` symbolically before its first epoch
  (Keras' `_maybe_symbolic_build`): a Keras model made under a strategy's
  scope keeps that strategy, and its fit then opens the training data once
  (drawing a batch) and builds `model.optimizer` on the trainable
  variables. Without a Keras model: whether `strategy` is one whose scope
  makes it current (every strategy but the default)."""
  if isinstance(model, keras.Model):
    return getattr(model, "_distribute_strategy", None) is not None
  with strategy.scope():
    return tf.distribute.has_strategy()


def is_multi_worker(strategy):
  """Whether `strategy` spans workers, whose collectives can lose a peer."""
  return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def runs_replicas_in_threads(strategy):
  """Whether `strategy.run` calls the replica function in a thread of each
  replica's, as the mirrored strategies do even with one replica; a
  function compiled inside such a call cannot `merge_call`."""
  return isinstance(strategy, (tf.distribute.MirroredStrategy,
                               tf.distribute.MultiWorkerMirroredStrategy))


def check_jit_compile(strategy):
  """XLA on the CPU reaches only the variables on the device it compiles
  for: a strategy with replicas on several of this machine's CPU devices
  (`split_cpu`) places theirs on each, and every XLA loop, fit's too, fails
  at its first step (TensorFlow's XLA known issue "tf.Variable on a
  different device"). Refused here in one line."""
  if strategy.num_replicas_in_sync == 1:
    return
  devices = strategy.extended.worker_devices
  if len(devices) > 1 and all(
      tf.DeviceSpec.from_string(device).device_type == "CPU"
      for device in devices):
    raise ValueError(
        f"jit_compile cannot train replicas on several CPU devices "
        f"({len(devices)} here): XLA reaches only the variables of the "
        f"device it compiles for. Use jit_compile=False, or one device.")


def check_gradient_accumulation(optimizers, strategy, runs_eagerly):
  """Keras' optimizer accumulates gradients under a `cond` holding the
  replicas' `merge_call`, which a compiled step under a mirrored strategy
  (of any replica count) cannot take: every compiled loop, fit's too,
  fails at its first step. The eager loop sums the replicas' gradients
  before it accumulates, as one replica would. Refused here in one line."""
  if runs_eagerly or not runs_replicas_in_threads(strategy):
    return
  for name, optimizer in optimizers.items():
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # loss scaling
    if getattr(inner, "gradient_accumulation_steps", None):
      raise ValueError(
          f"gradient_accumulation_steps (optimizer {name!r}) under "
          f"{type(strategy).__name__} trains in loop='eager' only: Keras "
          f"accumulates under a cond a compiled step cannot take across the "
          f"replicas' merge_call (fit fails there too). Use loop='eager', "
          f"or the default or one_device strategy.")


def make_strategy(name, cpu_replicas=None):
  """Returns the `tf.distribute.Strategy` called `name`.

  One `"mirrored"` strategy per set of devices, reused by every call: two
  number their collective ops from the same keys, and a process that
  trained with one and then another on the same devices would have their
  collectives meet (`CollectiveMismatchError`).

  Args:
    name: one of `STRATEGIES`. `"multi_worker"` is
      `MultiWorkerMirroredStrategy`, configured from the `TF_CONFIG`
      environment variable.
    cpu_replicas: with `"mirrored"` (or `"multi_worker"`), split the CPU into
      this many logical devices and mirror over them, so replicated training
      runs on a machine without accelerators. Must be called before
      TensorFlow runs its first op.
  """
  if name not in STRATEGIES:
    raise ValueError(f"Unknown strategy {name!r}; expected one of "
                     f"{', '.join(STRATEGIES)}.")
  if cpu_replicas is not None and cpu_replicas < 1:
    raise ValueError(f"cpu_replicas must be >= 1, got {cpu_replicas}.")
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "one_device":
    device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device)
  if name == "mirrored":
    devices = (tuple(d.name for d in split_cpu(cpu_replicas))
               if cpu_replicas and cpu_replicas > 1 else None)
    if devices not in _MIRRORED:
      _MIRRORED[devices] = tf.distribute.MirroredStrategy(devices)
    return _MIRRORED[devices]
  if "TF_CONFIG" not in os.environ:
    raise ValueError("multi_worker needs the TF_CONFIG environment variable "
                     "(cluster and task); see tf.distribute docs.")
  json.loads(os.environ["TF_CONFIG"])  # a clear JSON error, before TF's own
  if cpu_replicas and cpu_replicas > 1:
    split_cpu(cpu_replicas)
  return tf.distribute.MultiWorkerMirroredStrategy(
      communication_options=tf.distribute.experimental.CommunicationOptions(
          timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS))


_MIRRORED = {}  # devices (None: all of them) -> the strategy over them


def split_cpu(count):
  """Splits the first CPU into `count` logical devices; returns them.

  Logical devices can only be configured before TensorFlow initializes its
  runtime; afterwards an existing split of at least `count` is reused.
  """
  cpu = tf.config.list_physical_devices("CPU")[0]
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count)
  except RuntimeError as error:
    if len(tf.config.list_logical_devices("CPU")) < count:
      raise RuntimeError(
          f"Cannot split the CPU into {count} devices: TensorFlow is already "
          "initialized. Create the strategy before running any op.") from error
  return tf.config.list_logical_devices("CPU")[:count]
