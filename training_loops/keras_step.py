"""`KerasStep`: a model's own `train_step` (and `test_step`), as `model.fit`
runs it, in every loop.

Keras' guide "Customizing what happens in fit()" overrides `train_step`
(a GAN with two optimizers, a VAE's ELBO, a gradient penalty) or
`compute_loss` (`keras.distillation.Distiller`); `model.fit` calls that
step inside `strategy.run` and averages its logs over the replicas. This
adapter makes the same call the `step.TrainingStep` the loops drive.
"""

import keras
import tensorflow as tf
# Raised by a trace that creates a mirrored variable; no public name.
from tensorflow.python.ops import op_selector

from training_loops import strategies
from training_loops.step import TrainingStep
from training_loops.supervised_step import first_line, shapes

# The methods whose override makes a model's training its own.
STEP_METHODS = ("train_step", "test_step", "compute_loss")


def overrides_step(model):
  """Whether `model`'s class overrides Keras' `train_step`, `test_step` or
  `compute_loss`."""
  return isinstance(model, keras.Model) and any(
      getattr(type(model), name) is not getattr(keras.Model, name)
      for name in STEP_METHODS)


class KerasStep(TrainingStep):
  """The `TrainingStep` of a compiled `keras.Model` whose class defines
  its own step.

  As fit: the step's logs are averaged over the replicas
  (`log_reduction`), and an epoch's (an evaluation's) logs are the model's
  metric results when their names are those of the last step's logs, else
  the last step's logs (Keras' `_get_metrics_result_or_logs`).

  Args:
    model: a compiled `keras.Model` (any `compile` signature: the model is
      not compiled again); build inside `strategy.scope()`.
    strategy: the `tf.distribute.Strategy` it was built under.
  """

  log_reduction = "mean"

  def __init__(self, model, strategy=None):
    super().__init__(model, strategy)
    if not model.compiled:
      raise ValueError(
          f"{type(model).__name__} overrides "
          f"{'/'.join(name for name in STEP_METHODS)}: compile it in "
          "model_fn (its optimizers and losses are its own), as model.fit "
          "needs.")
    self._logs_specs = {}
    self._unbuilt = []  # the optimizers not built before the step's trace

  def train_replica_step(self, batch):
    return _logs("train_step", self.model.train_step(batch))

  def eval_replica_step(self, batch):
    return _logs("test_step", self.model.test_step(batch))

  def build(self, train_spec, eval_spec=None):
    """Traces the distributed steps once on the data's specs, as fit's
    first call traces them: the optimizers and metrics that the step builds
    lazily (every optimizer but `model.optimizer`, which Keras' symbolic
    build alone would build) exist before a checkpoint is restored into
    them, and the logs' structure is known. Nothing runs: no state
    changes.

    Under a strategy, `model.optimizer` is built first, on the model's
    trainable variables, as fit's symbolic build does. Under several
    replicas no other variable can be created inside the trace (a mirrored
    variable's copies are initialized from the first one's, which a traced
    function cannot lift out): an optimizer the step would create is
    refused in one line, as fit fails there too."""
    optimizer = self.model.optimizer
    if (strategies.fit_builds_symbolically(self.model, self.strategy)
        and isinstance(optimizer, keras.optimizers.Optimizer)
        and not optimizer.built):
      optimizer.build(self.model.trainable_variables)
    self._unbuilt = sorted(
        name.lstrip("_") for name, value in vars(self.model).items()
        if isinstance(value, keras.optimizers.Optimizer) and not value.built)
    self._logs_specs[True] = self._traced_logs(self.train_replica_step,
                                               train_spec)
    if eval_spec is not None:
      self._logs_specs[False] = self._traced_logs(self.eval_replica_step,
                                                  eval_spec)

  def _traced_logs(self, replica_step, spec):
    batch_spec = tf.nest.map_structure(_any_batch_size, spec)
    try:
      logs = tf.function(self.distribute(replica_step, guarded=False)
                         ).get_concrete_function(batch_spec).structured_outputs
    except (ValueError, TypeError, KeyError) as error:
      raise ValueError(
          f"{type(self.model).__name__}'s step does not accept the data's "
          f"batches {shapes(spec)}: {first_line(error)}") from None
    except op_selector.UnliftableError as error:
      replicas = self.strategy.num_replicas_in_sync
      name = type(self.model).__name__
      if self._unbuilt:
        raise ValueError(
            f"{name}'s step creates its optimizers' state "
            f"({', '.join(self._unbuilt)}) in its first step, which "
            f"{replicas} replicas cannot: build each in model_fn, "
            f"`optimizer.build(the variables it updates)`, as model.fit "
            f"under this strategy needs too.") from None
      raise ValueError(
          f"{name}'s step creates variables in its first step, which "
          f"{replicas} replicas cannot ({first_line(error)}): create them "
          f"in model_fn.") from None
    return tf.nest.map_structure(
        lambda value: tf.TensorSpec(value.shape, value.dtype), logs)

  def logs_spec(self, training=True):
    if training not in self._logs_specs:
      raise ValueError(f"{'Training' if training else 'Evaluation'} logs "
                       "are unknown before KerasStep.build is given its "
                       "data's spec.")
    return self._logs_specs[training]

  def reset(self):
    self.model.reset_metrics()

  def reset_eval(self):
    # As Keras' `evaluate`: the model's metrics serve both.
    self.model.reset_metrics()

  def train_logs(self, last_logs=None):
    return self._metrics_or(last_logs)

  def eval_logs(self, last_logs=None, prefix="val_"):
    return {prefix + key: value
            for key, value in self._metrics_or(last_logs).items()}

  def _metrics_or(self, last_logs):
    results = self.model.get_metrics_result()
    if last_logs is None or set(last_logs) == set(results):
      return results
    return dict(last_logs)

  def optimizers(self):
    """Every `keras.optimizers.Optimizer` among the model's attributes
    (`model.optimizer`, a GAN's `d_optimizer` and `g_optimizer`) that the
    step builds: an optimizer `compile` made but the step never applies
    has no state."""
    found = {}
    for name, value in [("optimizer", self.model.optimizer),
                        *sorted(vars(self.model).items())]:
      if (isinstance(value, keras.optimizers.Optimizer) and value.built
          and all(value is not seen for seen in found.values())):
        found[name.lstrip("_")] = value
    return found

  def progress_variables(self):
    return list(self.model.metrics_variables)

  def finish(self):
    # As fit: only `model.optimizer` ends on its moving averages.
    if isinstance(self.model.optimizer, keras.optimizers.Optimizer):
      self.model.optimizer.finalize_variable_values(
          self.model.trainable_weights)


def _logs(method, logs):
  if not isinstance(logs, dict):
    raise ValueError(f"{method} must return a dict of logs (name -> "
                     f"scalar), as model.fit needs; got "
                     f"{type(logs).__name__}.")
  return {key: tf.convert_to_tensor(value) for key, value in logs.items()}


def _any_batch_size(spec):
  if isinstance(spec, tf.TensorSpec) and spec.shape.rank:
    return tf.TensorSpec([None, *spec.shape[1:]], spec.dtype)
  return spec
