"""`TrainingStep`: what a loop needs from a training step.

As Orbit's `StandardTrainer` and Keras' `train_step`, a step says what one
training (and one evaluation) step does on one replica's batch and returns
its logs; the loops (`drivers`) decide how steps are run, and the
`Controller` everything around them. Two implementations ship:
`trainer.Trainer`, the supervised step `train(model_fn, optimizer_fn, loss,
...)` builds, and `keras_step.KerasStep`, a model's own `train_step` as
`model.fit` runs it. A researcher may implement the protocol directly
(BUILD.md, "Adding a training step").
"""

import abc
import functools
import math

import tensorflow as tf

from training_loops.strategies import is_multi_worker


class TrainingStep(abc.ABC):
  """One replica's training and evaluation step, and the state around it.

  Attributes:
    model: the `keras.Model` that callbacks see (`self.model`,
      `stop_training`); its `variables` (weights, statistics, seed state)
      are checkpointed.
    strategy: the `tf.distribute.Strategy` everything was built under.
    log_reduction: how a step's logs are reduced over the replicas:
      `"first"` (every replica returns the same logs) or `"mean"` (each its
      own, averaged as `model.fit` averages a custom step's logs).
  """

  log_reduction = "first"

  def __init__(self, model, strategy=None):
    self.model = model
    self.strategy = strategy or tf.distribute.get_strategy()

  # -- the steps -----------------------------------------------------------

  @abc.abstractmethod
  def train_replica_step(self, batch):
    """Trains on this replica's `batch`; returns a dict of scalar logs.

    Runs inside `strategy.run`, eagerly (the eager loop) or traced (the
    others, also inside `tf.while_loop` and XLA): no Python side effects
    that should happen every step. A log whose name holds "loss" is checked
    to be finite after every call (all logs when none does)."""

  @abc.abstractmethod
  def eval_replica_step(self, batch):
    """Evaluates this replica's `batch` into the evaluation state; returns
    a dict of scalar logs."""

  @abc.abstractmethod
  def logs_spec(self, training=True):
    """The `tf.TensorSpec` structure of the distributed train (or eval)
    step's logs: the graph loop carries the last ones through its
    `tf.while_loop`. Known after `build`."""

  def build(self, train_spec, eval_spec=None):
    """Creates every variable the steps will use (optimizer slots, lazily
    built metrics) before a checkpoint is restored into them or a step
    runs; `train_spec`, `eval_spec` are the element specs of the training
    and validation data. Call inside `strategy.scope()`."""

  # -- state and results ---------------------------------------------------

  @abc.abstractmethod
  def reset(self):
    """At an epoch's start: clears the running training results."""

  @abc.abstractmethod
  def reset_eval(self):
    """Before an evaluation: it reports only its own batches."""

  @abc.abstractmethod
  def train_logs(self, last_logs=None):
    """The epoch's results so far, given the last step's (reduced) logs
    (None before the epoch's first step)."""

  @abc.abstractmethod
  def eval_logs(self, last_logs=None, prefix="val_"):
    """An evaluation's results, its keys prefixed with `prefix`."""

  @abc.abstractmethod
  def optimizers(self):
    """`{name: optimizer}`: every optimizer the step applies, checkpointed
    and, with one, its learning rate logged."""

  def checkpoint_objects(self):
    """`{name: trackable}`: the state a checkpoint must hold to resume the
    run exactly, beside the running results (`progress_variables`)."""
    # `model.variables`, not `model`: Keras' object graph does not reach the
    # seed generators' state (dropout's, a GAN's noise), which a resume
    # needs.
    return {"model_variables": list(self.model.variables),
            **{_checkpoint_name(name): optimizer
               for name, optimizer in self.optimizers().items()}}

  @abc.abstractmethod
  def progress_variables(self):
    """The variables of a partial epoch's running results, so a run
    stopped mid-epoch resumes its logs exactly."""

  def kept_across_validation(self):
    """The variables a validation between training steps leaves as they
    were, so that validating by step changes no training: the running
    results (a Keras model's metrics serve training and validation) and
    the model's random seeds (a `test_step` may draw noise)."""
    return [*self.progress_variables(),
            *(variable for variable in self.model.variables
              # The name Keras gives every `SeedGenerator`'s state.
              if variable.path.endswith("seed_generator_state"))]

  def finish(self):
    """After the last epoch, before `on_train_end` (as `model.fit` ends
    on an optimizer's moving averages with `use_ema`)."""

  # -- distributed ---------------------------------------------------------

  def distribute(self, replica_step, guarded=True):
    """`step(distributed_batch)`: `replica_step` on every replica, its logs
    reduced by `log_reduction`; `guarded`, every op after the batch.

    A trace that creates variables (`build`'s) must not be guarded: their
    initial values would depend on the batch, and cannot be lifted out of
    the graph."""
    strategy = self.strategy
    if guarded:
      replica_step = guarded_by_batch(replica_step)

    def step(distributed_batch):
      per_replica = strategy.run(replica_step, args=(distributed_batch,))
      return tf.nest.map_structure(
          lambda value: _reduced(strategy, value, self.log_reduction),
          per_replica)
    return step


def own_function(python_function, **options):
  """`tf.function(python_function, **options)`, whose tracing TensorFlow
  counts apart from other functions made from the same code.

  TensorFlow warns when five calls in a row trace, counting together every
  function made from one piece of code. The drivers (and the summaries'
  passes) make theirs anew for each model, and each traces once per
  signature; counted together, a process that builds many (the report,
  the test suite) would be warned of a retracing that is none. Made from a
  `functools.partial`, which has no code of its own, each function is
  counted alone, and the warning means what it says: one function tracing
  again and again.
  """
  alone = functools.partial(python_function)
  alone.__name__ = python_function.__name__  # the trace's and profile's name
  return tf.function(alone, **options)


def guarded_by_batch(replica_step):
  """`replica_step` with every op after its batch.

  State that does not depend on the batch (a tracker's count, dropout's
  seed) must not change without it: in a graph, a step whose fetch fails
  (the function loop's end of the data) would otherwise still advance it.
  Inside the replica step, not around that fetch: MirroredStrategy builds
  each replica's step in its own thread, which a control-dependency scope
  outside `strategy.run` does not reach. Ops that already read the batch
  get no extra edge.
  """
  def guarded(batch):
    with tf.control_dependencies(tf.nest.flatten(batch)):
      return replica_step(batch)
  return guarded


def _checkpoint_name(name):
  # The supervised step's one optimizer keeps the name checkpoints have
  # always used, so theirs still restore.
  return "optimizer" if name == "optimizer" else f"optimizer_{name}"


def _reduced(strategy, value, reduction):
  results = strategy.experimental_local_results(value)
  if len(results) == 1 or reduction == "first":
    return results[0]
  if is_multi_worker(strategy):
    return strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
  # As fit's `reduce_per_replica(..., "mean")`: the local replicas' mean.
  return tf.reduce_mean(tf.stack(results), axis=0)


def losses_of(logs):
  """The logs the finite check watches: those named like a loss, or all
  of them when none is."""
  named = {key: value for key, value in logs.items() if "loss" in key}
  return named or dict(logs)


def all_finite(logs):
  """In a graph: whether every watched log is finite. A scalar costs one
  op, since the graph loop asks after every step."""
  checks = [tf.math.is_finite(value) if value.shape.rank == 0
            else tf.reduce_all(tf.math.is_finite(value))
            for value in losses_of(logs).values()
            if value.dtype.is_floating]
  if len(checks) == 1:
    return checks[0]
  return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def first_non_finite(logs):
  """`(name, value)` of the first watched scalar log that is not finite,
  or None. Asked after every call of a custom loop: a scalar is read as
  one float."""
  for key, value in losses_of(logs).items():
    if not len(getattr(value, "shape", ())):  # a scalar tensor or number
      number = float(value)
      if not math.isfinite(number):
        return key, number
  return None


def no_logs(step, training=True):
  """Zeros shaped as `step`'s train (or eval) logs: the logs a graph loop
  carries before its first step."""
  return tf.nest.map_structure(
      lambda s: tf.zeros([d or 0 for d in s.shape], s.dtype),
      step.logs_spec(training))
