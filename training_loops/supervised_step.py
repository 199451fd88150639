"""The supervised training step: `(x, y[, sample_weight])` -> forward -> the
losses -> one optimizer, as `model.fit`'s default `train_step`.

As in Orbit, `Trainer` owns the model, optimizer, losses and metrics and
defines what one step does on a replica (`step.TrainingStep`); `drivers`
decide how steps are run (eagerly, one `tf.function` call a step, or many a
call).
"""

import dataclasses
import math

import keras
import tensorflow as tf

from training_loops import strategies
from training_loops.step import TrainingStep


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""

  def __init__(self, epoch, step, loss, name=None):
    where = (f"step {step} of that epoch" if step is not None
             else "model.fit reports no step")
    what = "Training loss" if name is None else f"Training log {name!r}"
    super().__init__(
        f"{what} became {loss} at epoch {epoch} (0-based), {where}; "
        "stopped. The last checkpoint, if any, is the last good state.")
    self.epoch, self.step, self.loss, self.name = epoch, step, loss, name


class TrainingDataError(ValueError):
  """A training or evaluation step rejected a batch (e.g. a label outside
  the model's classes, which only shows once the data reaches the graph)."""

  def __init__(self, epoch, error):
    message = _cause_of(error)
    where = "" if epoch is None else f" in epoch {epoch} (0-based)"
    super().__init__(f"A batch{where} was rejected: {message}")
    self.epoch = epoch


def first_line(error):
  """An error's message cut to its first line, for one-line reports of
  bad input."""
  return str(error).strip().splitlines()[0]


def shapes(structure):
  """The shapes of a structure of tensors or specs, as tuples, for
  messages."""
  return tf.nest.map_structure(lambda t: tuple(t.shape), structure)


def _cause_of(error):
  """The line of a TensorFlow error that says what went wrong, without the
  "Graph execution error:" banner, the Python stack or the node names."""
  lines = [line for line in str(getattr(error, "message", error)).splitlines()
           if line.strip() and not line[0].isspace()
           and not line.startswith(("Graph execution error",
                                    "Detected at node", "[["))]
  return lines[-1] if lines else str(error)


@dataclasses.dataclass(frozen=True)
class Output:
  """One output of a model of several: its position among the model's
  outputs and its name.

  As fit, an output's targets, predictions and sample weights are picked by
  name from a dict and by position from a list or tuple, whatever structure
  the model returns: a loss, metric or target given under either reaches
  the same output. Either may be unknown (None) for a model without output
  names (subclassed), which is then taken at its word.
  """
  index: int | None
  name: str | None

  def __str__(self):
    return str(self.name if self.name is not None else self.index)

  def picks_from(self, structure):
    """Whether `pick` finds this output in `structure` (a dict or tuple)."""
    if isinstance(structure, dict):
      return self.name in structure
    return self.index is not None and self.index < len(structure)

  def pick(self, structure):
    if not self.picks_from(structure):
      raise KeyError(str(self))
    return structure[self.name if isinstance(structure, dict)
                     else self.index]


def output_of(model, key):
  """The `Output` of `model` a loss, metric or weight keyed by `key` (an
  output name or a position) is for."""
  names = output_names(model)
  if isinstance(key, int):
    if not names:  # fit would name the logs after the losses instead
      raise ValueError(
          "Losses or metrics per output position need a model with output "
          "names (a functional model); a subclassed model of several "
          "outputs returns them as a dict, its losses and metrics keyed by "
          "its keys.")
    return Output(key, names[key] if key < len(names) else None)
  return Output(names.index(key) if key in names else None, key)


def output_names(model):
  """The names of `model`'s outputs in their order, as fit knows them: a
  functional model built on a dict of outputs, its keys sorted (the names
  its predictions carry, whatever its layers are called); otherwise its
  output layers' names; none for a subclassed model."""
  try:
    structure = model.output
  except (AttributeError, ValueError):  # subclassed, or not built
    structure = None
  if isinstance(structure, dict):
    return sorted(structure)
  return list(getattr(model, "output_names", None) or ())


@dataclasses.dataclass(frozen=True)
class _OutputLoss:
  """The loss of one model output: `output` (an `Output`) picks it from `y`
  and predictions (`None` for a single-output model)."""
  output: Output | None
  report_name: str
  per_example: keras.losses.Loss  # with reduction "none"
  weight: float


class Trainer(TrainingStep):
  """The supervised `TrainingStep` of one model, optimizer and loss.

  Build inside `strategy.scope()`: metric copies create variables there.

  Args:
    model: a built or buildable `keras.Model`.
    optimizer: a `keras.optimizers.Optimizer`.
    loss: a `keras.losses.Loss`, or for a multi-output model a dict (output
      name -> loss) or list (one per output position), as fit takes them.
    loss_weights: for multi-output models, a dict or list of floats.
    metrics: `keras.metrics.Metric` objects; for multi-output models a dict
      output name -> list, or a list of lists (one per output position).
      Copied, so the caller's objects stay untouched.
      Like Keras' `metrics`, they ignore sample weights.
    strategy: the `tf.distribute.Strategy` the model was built under.
  """

  def __init__(self, model, optimizer, loss, loss_weights=None, metrics=(),
               strategy=None):
    super().__init__(model, strategy)
    self.optimizer = optimizer
    self.loss, self.loss_weights = loss, loss_weights
    self.output_losses = _output_losses(model, loss, loss_weights)
    self.train_trackers = {"loss": keras.metrics.Mean(name="loss")}
    # As fit: a tracker per output loss when there are several.
    if len(self.output_losses) > 1:
      for output in self.output_losses:
        self.train_trackers[output.report_name] = keras.metrics.Mean(
            name=output.report_name)
    keyed = self.output_losses[0].output is not None
    self.train_metrics = _copied_metrics(model, metrics, keyed)
    self.eval_metrics = _copied_metrics(model, metrics, keyed)
    self.eval_trackers = {name: keras.metrics.Mean(name=name)
                          for name in self.train_trackers}
    self.compiled = {}  # method name -> its `Compiled`, for eager steps

  def build_metrics(self, targets, predictions):
    """Traces each metric copy's update once on the specs of an example's
    `targets` and `predictions`, as fit builds its metrics before its first
    step: metrics that create state at their first update
    (Keras' `F1Score`, `R2Score`, multi-label `AUC`) have it before the
    loops reset, checkpoint or restore them, and a metric that does not fit
    the model's outputs says so before training. Traced, not run, as fit's
    are built on symbolic tensors: a metric that checks its targets' values
    sees only real batches. Also settles the names they report under,
    prefixed by their output's where the model gives several outputs, as
    fit names them. Call inside the strategy's scope."""
    several_outputs = len(tf.nest.flatten(predictions)) > 1
    # One output and one tensor of targets: every metric is the model's,
    # whatever name or position it is keyed by, as fit takes them (a name
    # the model does not have was refused before, where it has names).
    one_to_one = not (tf.nest.is_nested(targets)
                      or tf.nest.is_nested(predictions))
    self.train_metrics = _reported(self.train_metrics, several_outputs,
                                   one_to_one)
    self.eval_metrics = _reported(self.eval_metrics, several_outputs,
                                  one_to_one)
    loss_outputs = [loss.output for loss in self.output_losses]
    for (output, name), metric in (*self.train_metrics.items(),
                                   *self.eval_metrics.items()):
      if not tf.nest.is_nested(targets) and output not in (None,
                                                           *loss_outputs):
        # One tensor of targets is the output's with the loss.
        owners = ("the model's output" if loss_outputs == [None] else
                  f"{[str(loss) for loss in loss_outputs]}")
        raise ValueError(
            f"Metric {name!r} is for output {str(output)!r}, but the "
            f"targets are one tensor, for {owners}: give the targets as a "
            f"dict.")
      try:
        y_true, y_pred = (_batch_spec(_pick(structure, output))
                          for structure in (targets, predictions))
      except KeyError:
        raise ValueError(
            f"Metric {name!r} is for output {str(output)!r}, which the "
            f"targets or the model's outputs do not have.") from None
      _build_metric(name, metric, y_true, y_pred)

  # -- per replica ---------------------------------------------------------

  def train_replica_step(self, batch):
    """One optimizer step on this replica's shard; returns `{"loss": the
    global batch loss}` (identical on every replica).

    Eagerly, the step after the gradient (`update`) runs as one compiled
    call (`Compiled`): the same ops, but dispatched one by one the
    optimizer's per-variable updates and the metrics' bookkeeping cost more
    than the model's forward and backward passes. So a metric's or an
    optimizer's own code runs traced, not eagerly;
    `tf.config.run_functions_eagerly(True)` runs it eagerly too. Under a
    mirrored strategy it stays eager, since `strategy.run` calls each
    replica in a thread of its own, where a compiled call could not join
    the replicas' `merge_call`s.
    """
    return {"loss": _as_float32(
        self._train_on(batch, self._compiled_when_eager(self.update)))}

  def _compiled_when_eager(self, method):
    """`method` (`update` or `record_eval`), `Compiled` in an eager step
    outside a mirrored strategy's replica threads."""
    if not tf.executing_eagerly() or (
        strategies.runs_replicas_in_threads(self.strategy)):
      return method
    name = method.__name__
    if name not in self.compiled:
      self.compiled[name] = Compiled(method, self.model)
    return self.compiled[name]

  def _train_on(self, batch, update):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    with tf.GradientTape() as tape:
      predictions = self.model(x, training=True)
      loss = self._loss(y, predictions, sample_weight)
      # As fit's train step: a `LossScaleOptimizer` (or `loss_scale_factor`)
      # multiplies the loss so float16 gradients do not underflow, and its
      # `apply_gradients` divides them back, skipping overflowing steps.
      scaled_loss = self.optimizer.scale_loss(loss.replica)
    # Keras' optimizer sums gradients over replicas: each replica's loss is
    # already divided by the global example count.
    gradients = tape.gradient(scaled_loss, self.model.trainable_variables)
    # Decided while tracing: with one replica or no clipping, no extra op.
    if (self.strategy.num_replicas_in_sync > 1
        and _clips_gradients(self.optimizer)):
      gradients = self._first_replica_holds_the_sum(gradients)
    update(gradients, y, predictions, loss.tracked, _masks(predictions))
    return loss.global_mean

  def update(self, gradients, y, predictions, tracked, masks=None):
    """What a training step changes once its gradients are known: the
    optimizer's update, then the loss trackers and training metrics.

    One call with tensors in and nothing out, so that an eager step can
    compile it alone (`Compiled`).
    """
    self.optimizer.apply_gradients(
        zip(gradients, self.model.trainable_variables))
    _record(self.train_trackers, self.train_metrics, y,
            _masked(predictions, masks), tracked)

  def _first_replica_holds_the_sum(self, gradients):
    """The replicas' summed gradients on replica 0, zeros on the others.

    Keras' optimizer clips each replica's gradient before it sums them
    (tensorflow/tensorflow#33929), so `clipnorm`, `global_clipnorm` and
    `clipvalue` would act on shares and change with the replica count.
    Handed these, it clips the whole gradient on replica 0 by its own rules
    and in its own order (after a `LossScaleOptimizer` divides the scale
    out; the accumulated gradient with `gradient_accumulation_steps`),
    clips zeros on the others, and its sum adds them: one replica's step.
    The zeros are the sum times 0, so a non-finite sum is NaN on every
    replica, and a `LossScaleOptimizer` that checks each replica's
    gradients (strategies without `merge_call`) skips the step on all.
    """
    context = tf.distribute.get_replica_context()
    first = tf.equal(context.replica_id_in_sync_group, 0)
    sums = iter(context.all_reduce(
        tf.distribute.ReduceOp.SUM, [g for g in gradients if g is not None]))
    return [None if g is None else next(sums) * tf.cast(first, g.dtype)
            for g in gradients]

  def eval_replica_step(self, batch):
    """Evaluates this replica's shard into the eval trackers and metrics
    (eagerly, their update compiled as `train_replica_step`'s); returns
    `{"loss": the global batch loss}`."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    predictions = self.model(x, training=False)
    loss = self._loss(y, predictions, sample_weight)
    self._compiled_when_eager(self.record_eval)(
        y, predictions, loss.tracked, _masks(predictions))
    return {"loss": _as_float32(loss.global_mean)}

  def record_eval(self, y, predictions, tracked, masks=None):
    """An evaluation step's update of the eval trackers and metrics; like
    `update`, compiled alone in an eager step."""
    _record(self.eval_trackers, self.eval_metrics, y,
            _masked(predictions, masks), tracked)

  def logs_spec(self, training=True):
    del training  # the same for both
    return {"loss": tf.TensorSpec([], tf.float32)}

  # -- results -------------------------------------------------------------

  def reset(self):
    for metric in (*self.train_trackers.values(),
                   *self.train_metrics.values()):
      metric.reset_state()
    self.reset_eval()

  def reset_eval(self):
    """Before an evaluation: it reports only its own batches, as Keras'
    `evaluate` does (a run may validate several times an epoch)."""
    for metric in (*self.eval_trackers.values(), *self.eval_metrics.values()):
      metric.reset_state()

  def train_logs(self, last_logs=None):
    """This epoch's running results under Keras' keys."""
    del last_logs  # the trackers hold them
    return _results(self.train_trackers, self.train_metrics)

  def eval_logs(self, last_logs=None, prefix="val_"):
    del last_logs
    return {prefix + key: value for key, value in
            _results(self.eval_trackers, self.eval_metrics).items()}

  def optimizers(self):
    return {"optimizer": self.optimizer}

  def finish(self):
    # As fit: with `use_ema`, training ends on the moving averages.
    self.optimizer.finalize_variable_values(self.model.trainable_weights)

  def progress_variables(self):
    """The running loss and metric state of a partial training epoch."""
    return [variable for metric in (*self.train_trackers.values(),
                                    *self.train_metrics.values())
            for variable in metric.variables]

  # -- internals -----------------------------------------------------------

  def _loss(self, y, predictions, sample_weight):
    """This step's `StepLoss`.

    `replica` is this replica's share of the global batch loss: its
    weighted per-example sum over the global example count, so the replicas'
    gradients sum to the gradient of the global mean, also for a partial last
    batch split unevenly. `global_mean` is that mean, as Keras reports it.
    """
    replica_loss = local_loss = None
    tracked = {}
    for output in self.output_losses:
      y_true, y_pred = (_pick(y, output.output),
                        _pick(predictions, output.output))
      values = output.per_example(y_true, y_pred,
                                  _pick(sample_weight, output.output))
      local_sum = tf.reduce_sum(values)
      local_count = _count(values, y_pred)
      replica_share = _differentiable_share(
          local_sum, self._sum_over_replicas(local_count),
          _power_of_two(output.weight)
          and _scales_by_powers_of_two(self.optimizer))
      # Reported as Keras divides, so the loss is fit's to the bit.
      local_mean = tf.math.divide_no_nan(local_sum, local_count)
      replica_loss = _plus(replica_loss, _weighted(output.weight,
                                                   replica_share))
      local_loss = _plus(local_loss, _weighted(output.weight, local_mean))
      local_examples = _examples(values)
      if len(self.output_losses) > 1:  # a tracker per output loss
        tracked[output.report_name] = (local_mean, local_examples)
    if self.model.losses:  # regularization, counted once across replicas
      regularization = tf.add_n(self.model.losses)
      replica_loss += regularization / self.strategy.num_replicas_in_sync
      local_loss += regularization
    tracked["loss"] = (local_loss, local_examples)
    return StepLoss(replica_loss, self._sum_over_replicas(replica_loss),
                    tracked)

  def _sum_over_replicas(self, value):
    # One replica's sum is its value: no cross-replica call (each one a
    # `merge_call` in the eager loop).
    if self.strategy.num_replicas_in_sync == 1:
      return value
    return tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, value)


def _as_float32(loss):
  # A `mixed_float16` model's loss may come in its compute dtype; the loops
  # carry and check float32 logs. Decided while tracing: no op otherwise.
  return loss if loss.dtype == tf.float32 else tf.cast(loss, tf.float32)


class Compiled:
  """`function` compiled, with a trace for each set of trainable variables
  and each signature of its arguments.

  A trace keeps the variables it was traced with, while the eager gradient
  follows the model's current ones (a layer frozen or unfrozen between
  steps), as Keras' `run_eagerly` does. Each trace is called through its
  concrete function: `tf.function`'s own lookup of the trace for the
  arguments (a list of gradients, the predictions, a dict of losses) is a
  noticeable share of a small model's eager step.
  """

  def __init__(self, function, model):
    self.function, self.model = function, model
    self.functions = {}  # ids of the trainable variables -> tf.function
    self.concrete = {}  # (those ids, argument signature) -> its trace

  def __call__(self, *args):
    if tf.config.functions_run_eagerly():  # as a tf.function would
      return self.function(*args)
    variables = tuple(map(id, self.model.trainable_variables))
    key = (variables, _signature(args))
    concrete = self.concrete.get(key)
    if concrete is None:
      if variables not in self.functions:
        # A last, smaller batch traces once more, then reuses that trace.
        self.functions[variables] = tf.function(self.function,
                                                reduce_retracing=True)
      concrete = self.functions[variables].get_concrete_function(*args)
      self.concrete[key] = concrete
    return concrete(*args)


def _signature(arguments):
  """What picks a trace for `arguments` (of one call site, so of one
  nesting): each tensor's dtype and shape, and where there is None. A
  composite tensor counts by its components (an `IndexedSlices` gradient
  by the shape of its rows, not only the dense shape)."""
  return tuple(None if value is None else (value.dtype, tuple(value.shape))
               for value in tf.nest.flatten(arguments, expand_composites=True))


@dataclasses.dataclass(frozen=True)
class StepLoss:
  """A step's loss: `replica`, this replica's share of the global batch
  loss (what it differentiates); `global_mean`, the global batch loss;
  `tracked`, tracker name -> (mean, example count) to record."""
  replica: tf.Tensor
  global_mean: tf.Tensor
  tracked: dict


def _record(trackers, metrics, y, predictions, tracked):
  for name, (mean, examples) in tracked.items():
    # What `Mean.update_state(mean, sample_weight=examples)` adds, as fit's
    # loss tracker is updated, in three ops where it takes about ten.
    trackers[name].total.assign_add(mean * examples)
    trackers[name].count.assign_add(examples)
  # Unweighted, as Keras treats `metrics` (sample weights weigh the loss).
  for (output, _), metric in metrics.items():
    metric.update_state(_pick(y, output), _pick(predictions, output))


def _differentiable_share(local_sum, global_count, exact_as_product):
  """`local_sum / global_count`, to differentiate.

  As `local_sum * (1 / global_count)` where that is the division's gradient
  to the bit: a product by a constant differentiates in one op, a division
  in about ten (both operands', and their broadcast), a sixth of an eager
  step's ops. The gradient reaching the sum is then `upstream * (1 /
  count)` where the division's is `upstream / count`, the same number when
  the upstream (the output's loss weight times the optimizer's loss scale)
  is a power of two, as 1 is; `exact_as_product` says whether it is.
  """
  if exact_as_product:
    return local_sum * tf.math.reciprocal_no_nan(global_count)
  return tf.math.divide_no_nan(local_sum, global_count)


def _power_of_two(number):
  return number > 0 and math.frexp(number)[0] == 0.5


def _scales_by_powers_of_two(optimizer):
  """Whether `optimizer.scale_loss` multiplies the loss by powers of two
  only: by nothing, by a power-of-two `loss_scale_factor`, or by a
  `LossScaleOptimizer`'s scale from an initial power of two (it only
  doubles and halves)."""
  factors = [getattr(optimizer, "loss_scale_factor", None),
             getattr(optimizer, "initial_scale", None)]
  return all(factor is None or _power_of_two(factor) for factor in factors)


def _count(values, y_pred):
  """The number of per-example losses the mean divides by: all of them, or
  with a Keras mask on the output, the unmasked ones (the loss zeroes the
  masked), as Keras' `sum_over_batch_size` does."""
  mask = getattr(y_pred, "_keras_mask", None)
  if mask is not None:
    return tf.reduce_sum(tf.cast(mask, values.dtype))
  return _number(values.shape.num_elements(), tf.size, values)


def _examples(values):
  """The number of examples in `values` (per-example losses)."""
  return _number(values.shape[0], lambda values: tf.shape(values)[0], values)


def _number(static, compute, values):
  """`static` (from `values`' static shape) as a constant of their dtype,
  or if unknown, `compute(values)` cast to it: a constant is no op in an
  eager step, where each op costs tens of microseconds."""
  if static is None:
    return tf.cast(compute(values), values.dtype)
  return tf.constant(static, values.dtype)


def _masks(predictions):
  """The Keras masks of `predictions` (None where unmasked). `update` takes
  them apart from the predictions: Keras keeps a mask as a Python attribute
  of its tensor, which does not cross into a compiled function, and the
  metrics weigh by it."""
  return tf.nest.map_structure(
      lambda tensor: getattr(tensor, "_keras_mask", None), predictions)


def _masked(predictions, masks):
  """`predictions` with `masks` (from `_masks`) set on them again."""
  if masks is not None:
    for tensor, mask in zip(tf.nest.flatten(predictions),
                            tf.nest.flatten(masks)):
      if mask is not None:
        tensor._keras_mask = mask  # pylint: disable=protected-access
  return predictions


def _weighted(weight, loss):
  # Multiplying by 1.0 changes no bit, so it is left out: an op fewer.
  return loss if weight == 1.0 else weight * loss


def _plus(total, term):
  return term if total is None else total + term


def _clips_gradients(optimizer):
  clipping = getattr(optimizer, "inner_optimizer", optimizer)  # loss scaling
  return any((clipping.clipnorm, clipping.global_clipnorm,
              clipping.clipvalue))


def _pick(structure, output):
  """`output`'s targets, predictions or sample weights from a dict or tuple
  of them (`Output.pick`). A single tensor (or None) is every output's, as
  fit gives one array of sample weights to each loss, and one tensor of
  targets to the one output with a loss."""
  if output is None or not tf.nest.is_nested(structure):
    return structure
  return output.pick(structure)


def _build_metric(name, metric, y_true, y_pred):
  """Traces `metric`'s update on the specs `y_true`, `y_pred` and its
  result, refusing in one line a metric that does not fit them or whose
  result is not one number."""
  try:
    # A stateless scope defers the variables the trace creates and creates
    # them eagerly at its end, inside the strategy's scope (a mirrored
    # variable cannot be lifted out of a trace), as fit's symbolic build
    # does; it also keeps the trace's updates off them.
    with keras.StatelessScope():
      tf.function(metric.update_state,
                  autograph=False).get_concrete_function(y_true, y_pred)
      result = tf.function(metric.result, autograph=False
                           ).get_concrete_function().structured_outputs
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"Metric {name!r} does not fit the targets {tuple(y_true.shape)} "
        f"and outputs {tuple(y_pred.shape)}: {first_line(error)}") from None
  if not (tf.is_tensor(result) and result.shape.rank == 0):
    # The history, progress bar, TensorBoard scalars and history.json hold
    # one number per metric and epoch.
    raise ValueError(
        f"Metric {name!r} gives {_described(result)}; the loops log one "
        f"number per metric: give one metric per threshold or class, or an "
        f"averaged one (e.g. F1Score(average='macro')).")


def _described(result):
  if tf.is_tensor(result):
    return f"a result of shape {tuple(result.shape)}"
  return f"a {type(result).__name__} of results"


def _batch_spec(tensor):
  """The spec of a batch shaped as `tensor`, of any size."""
  return tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype)


def _output_losses(model, loss, loss_weights):
  """One `_OutputLoss` per output with a loss. As fit, a dict of losses or
  of weights is keyed by output name, a list by position, whatever
  structure the model returns."""
  if isinstance(loss, keras.losses.Loss):
    if loss_weights is not None:
      raise ValueError("loss_weights apply to a dict or list of losses.")
    return [_OutputLoss(None, "loss", _unreduced(loss), 1.0)]
  if isinstance(loss, dict):
    _check_output_names("loss", list(loss), model)
  elif isinstance(loss, (list, tuple)):
    names = output_names(model)
    if names and len(names) != len(loss):
      raise ValueError(f"{len(loss)} losses for a model with {len(names)} "
                       f"outputs ({names}).")
  else:
    raise ValueError(f"loss must be a keras.losses.Loss, or a dict or list "
                     f"of them; got {type(loss).__name__}.")
  keys = list(loss) if isinstance(loss, dict) else range(len(loss))
  outputs = [output_of(model, key) for key in keys]
  weights = _loss_weights(model, loss_weights, outputs,
                         isinstance(loss, dict))
  return [_OutputLoss(output, f"{output}_loss", _unreduced(loss[key]),
                      weight)
          for key, output, weight in zip(keys, outputs, weights)]


def _loss_weights(model, loss_weights, outputs, losses_by_name):
  """The weight of each of `outputs`: `loss_weights` in the structure of
  the losses, a dict (output name -> weight; 1 where missing) for a dict
  (`losses_by_name`), a list (one per loss, in order) for a list. A mixed
  pair is refused: fit pairs the two structures' flattened orders, which
  can give one output's weight to another."""
  if loss_weights is None:
    return [1.0] * len(outputs)
  if isinstance(loss_weights, dict) != losses_by_name:
    raise ValueError(
        f"loss_weights is a {type(loss_weights).__name__} but the losses "
        f"are a {'dict' if losses_by_name else 'list'}: give the weights "
        f"in the losses' structure (fit would pair them by position, not "
        f"by output).")
  if isinstance(loss_weights, dict):
    _check_output_names("loss_weights", list(loss_weights), model)
    named = {output_of(model, key): weight
             for key, weight in loss_weights.items()}
    unknown = [str(output) for output in named if output not in outputs]
    if unknown:
      raise ValueError(f"loss_weights name outputs without a loss: "
                       f"{sorted(unknown)}.")
    return [named.get(output, 1.0) for output in outputs]
  if len(loss_weights) != len(outputs):
    raise ValueError(f"{len(loss_weights)} loss_weights for "
                     f"{len(outputs)} losses: give one per loss.")
  return list(loss_weights)


def _check_output_names(what, keys, model):
  """Refuses `what` (a loss, weights or metrics dict) naming an output the
  model does not have, as fit does; a model without output names
  (subclassed) is taken at its word."""
  outputs = output_names(model)
  unknown = [key for key in keys if outputs and key not in outputs]
  if unknown:
    raise ValueError(f"The {what} dict names outputs the model does not "
                     f"have: {unknown}; its outputs are {outputs}.")


def _unreduced(loss):
  """A copy of `loss` returning weighted per-example values."""
  if not isinstance(loss, keras.losses.Loss):
    raise ValueError(f"Each loss must be a keras.losses.Loss (e.g. from "
                     f"`losses`), got {loss!r}.")
  # The step reduces as Keras' default does (the weighted sum over the
  # global batch's examples); another reduction would be silently replaced.
  if loss.reduction != "sum_over_batch_size":
    raise ValueError(f"{type(loss).__name__}(reduction={loss.reduction!r}) "
                     "is not supported: the loops reduce every loss as "
                     "Keras' default, 'sum_over_batch_size'.")
  return type(loss).from_config({**loss.get_config(), "reduction": "none"})


def _copied_metrics(model, metrics, keyed):
  """`{(Output or None, metric name): metric copy}` in a stable order; with
  `keyed` (losses per output) metrics are given per output too: a dict
  (output name -> list of metrics) or a list of lists (one per output), as
  fit takes them. `Trainer.build_metrics` settles the names they report
  under."""
  if isinstance(metrics, dict):
    _check_output_names("metrics", list(metrics), model)
    entries = [(output_of(model, key), metric)
               for key, group in metrics.items() for metric in group]
  elif metrics and all(isinstance(group, (list, tuple))
                       for group in metrics):
    entries = [(output_of(model, index), metric)
               for index, group in enumerate(metrics) for metric in group]
  elif keyed and metrics:
    raise ValueError("With a loss per output (a dict or list of losses, or "
                     "one loss for a model of several outputs, which applies "
                     "to each), give metrics per output too: a dict (output "
                     "name -> list of metrics) or a list of lists.")
  else:
    entries = [(None, metric) for metric in metrics]
  copies = {}
  for output, metric in entries:
    if not isinstance(metric, keras.metrics.Metric):
      raise ValueError(f"metrics must be keras.metrics.Metric objects, got "
                       f"{metric!r}.")
    _add_once(copies, (output, metric.name),
              type(metric).from_config(metric.get_config()))
  return copies


def _reported(metrics, prefixed, one_to_one):
  """`metrics` keyed by the names they report under: prefixed by their
  output's where the model has several outputs, as fit names them; with
  `one_to_one` (one output, one tensor of targets), all for the model's
  one output (None)."""
  reported = {}
  for (output, name), metric in metrics.items():
    if one_to_one:
      output = None
    _add_once(reported, (output, f"{output}_{name}"
                         if output is not None and prefixed else name),
              metric)
  return reported


def _add_once(metrics, key, metric):
  """`metrics[key] = metric`, refusing a second metric under the same
  `(output, name)`: one entry of the logs for two."""
  if key in metrics:
    raise ValueError(f"Two metrics report as {key[1]!r}: give them "
                     f"distinct names.")
  metrics[key] = metric


def _results(trackers, metrics):
  logs = {name: tracker.result() for name, tracker in trackers.items()}
  logs.update({name: metric.result() for (_, name), metric in
               metrics.items()})
  return logs
