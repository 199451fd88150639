"""`training_loops.compare`: loops trained in lockstep, and the first step
and variable where one parts from the others;
`research.tools.compare --trace`."""

import keras
import numpy as np
import pytest

import layers
import losses
import training_loops
from training_loops import drivers, keras_fit
from research.experiments import classify
from research.tools import compare as compare_script
from loop_models import accuracy, classification_data, sgd

NUDGE = 1e-3


def _classifier():
  """The tiny classifier with dropout, named, so that every loop's model
  has the same variable paths."""
  return keras.Sequential([
      keras.Input((4,)), layers.Dense(8, "relu", name="hidden"),
      layers.BatchNormalization(name="norm"),
      layers.Dropout(0.25, seed=7, name="dropout"),
      layers.Dense(3, "softmax", name="output")], name="net")


def _data():
  """Four batches an epoch (16, 16, 16, 2), reshuffled every epoch; the
  order also depends on the global seed when the dataset is built, so it is
  set here, not left to whichever test ran before."""
  keras.utils.set_random_seed(3)
  return classification_data(sample_weights=True, shuffle=True)


def _compare(**kwargs):
  return training_loops.compare(
      _classifier, sgd(), losses.SparseCategoricalCrossentropy(), _data(),
      seed=3, **kwargs)


def _perturbed(base, at_step, perturb):
  """The loop `base`, but after step `at_step` (from 1, across epochs)
  `perturb(trainer, logs)` runs and gives the logs it reports."""

  class Perturbed(base):

    def __init__(self, trainer, options=drivers.LoopOptions()):
      super().__init__(trainer, options)
      self.steps_run = 0

    def stepper(self, iterator):
      run = super().stepper(iterator)

      def perturbed_run(limit):
        steps, logs = run(limit)
        self.steps_run += steps
        if steps and self.steps_run == at_step:
          logs = perturb(self.trainer, logs)
        return steps, logs
      return perturbed_run
  return Perturbed


def _nudge_output_bias(trainer, logs):
  bias = trainer.model.get_layer("output").bias
  bias.assign(bias + [0.0, NUDGE, 0.0])
  return logs


def _misreport_loss(trainer, logs):
  del trainer
  return {**logs, "loss": logs["loss"] * (1 + NUDGE)}


@pytest.fixture
def register():
  """`register(name, driver_class)` as the recipe does, for one test."""
  names = []

  def add(name, driver_class):
    drivers.register(name)(driver_class)
    names.append(name)
  yield add
  for name in names:
    del drivers.DRIVERS[name]


def test_every_loop_agrees_step_by_step_across_epochs():
  report = _compare(steps=6, metrics=[accuracy()], optimizer_variables=True)
  assert report.agreed and report.first_divergence is None
  assert report.loops == training_loops.LOOPS
  assert report.steps_compared == 6
  assert str(report) == (
      "eager, function, graph and keras_fit agree over 6 steps: every loss "
      "and variable within rtol=1e-05, atol=1e-06 of eager's.")


def test_a_nudged_variable_is_named_at_its_step_with_both_values(register):
  """Against `train` run for the same three steps: the reference's value
  is its bias, the nudged loop's that plus the nudge. keras_fit, last,
  drives the lockstep from its batch hooks and stops there too."""
  register("nudged", _perturbed(drivers.FunctionDriver, 3,
                                _nudge_output_bias))
  report = _compare(loops=("function", "nudged", "keras_fit"))
  three_steps = training_loops.train(
      _classifier, sgd(), losses.SparseCategoricalCrossentropy(),
      _data().take(3), loop="function", seed=3, verbose=0).model
  bias = three_steps.get_layer("output").bias
  expected = float(bias.numpy()[1])

  assert not report.agreed and report.steps_compared == 3
  divergence = report.first_divergence
  assert (divergence.reference, divergence.loop) == ("function", "nudged")
  assert (divergence.step, divergence.epoch, divergence.step_in_epoch) == (
      3, 0, 3)
  assert divergence.variable == bias.path == "net/output/bias"
  assert divergence.element == (1,)
  assert (divergence.elements_beyond, divergence.elements) == (1, 3)
  np.testing.assert_allclose(divergence.reference_value, expected,
                             rtol=1e-5)
  np.testing.assert_allclose(divergence.value, expected + NUDGE, rtol=1e-5)
  np.testing.assert_allclose(divergence.relative_difference,
                             NUDGE / abs(expected), rtol=1e-3)
  assert divergence.relative_difference > report.rtol
  assert str(report).startswith(
      "nudged parts from function at step 3, epoch 0 (0-based) step 3: "
      "net/output/bias[1] is ")
  assert str(report).endswith(
      "function, nudged and keras_fit agreed over the 2 steps before.")


def test_a_misreported_loss_is_named_in_its_epoch(register):
  """The graph loop (all of an epoch in one call, here fed one batch at a
  time) reporting its fifth loss 0.1% high: epoch 1, step 1."""
  register("misreporting", _perturbed(drivers.GraphDriver, 5,
                                      _misreport_loss))
  report = _compare(loops=("eager", "misreporting"), steps=8)
  divergence = report.first_divergence
  assert report.steps_compared == 5
  assert (divergence.step, divergence.epoch, divergence.step_in_epoch) == (
      5, 1, 1)
  assert divergence.variable is None and divergence.element == ()
  np.testing.assert_allclose(
      divergence.value / divergence.reference_value, 1 + NUDGE, rtol=1e-6)
  # Up to the two loops' own rounding: unperturbed, their losses may differ
  # in the last bits of float32 (about 1e-7 relative).
  np.testing.assert_allclose(divergence.relative_difference, NUDGE,
                             rtol=0, atol=1e-6)
  assert " the loss is " in str(report)
  # Within a looser tolerance, the same loops agree.
  assert _compare(loops=("eager", "misreporting"), steps=8,
                  rtol=2 * NUDGE).agreed


def test_loops_agree_under_a_mirrored_strategy(mirrored):
  """Each replica gets its half of every replayed batch."""
  report = _compare(steps=3, strategy=mirrored)
  assert report.agreed, str(report)


@pytest.mark.parametrize("bad,match", [
    (dict(loops=("graph",)), r"two or more loops, got \('graph',\); choose "
     "from eager, function, graph, keras_fit"),
    (dict(loops="graph"), "two or more loops, got 'graph'"),
    (dict(loops=("graph", "fast")), "Unknown loop 'fast'; expected one of "
     "eager, function, graph, keras_fit"),
    (dict(loops=("graph", "graph")), "loops must differ"),
    (dict(loops=("keras_fit", "fit_again")), "At most one loop that runs its "
     "own epochs"),
    (dict(steps=0), "steps must be a positive int or None"),
    (dict(rtol=-1e-5), "rtol must be a finite number >= 0"),
    (dict(atol=float("nan")), "atol must be a finite number >= 0"),
    (dict(seed=None), "seed must be an int"),
    (dict(data=np.zeros((4, 2))), "data must be a batched tf.data.Dataset"),
    (dict(data=classification_data().take(0)), "data is empty"),
    (dict(data=classification_data().repeat()), "data repeats forever: "
     "pass steps"),
    (dict(jit_compile=True), "jit_compile needs loop=")])
def test_bad_arguments_are_one_line_errors(register, bad, match):
  register("fit_again", type("FitAgain", (keras_fit.KerasFitDriver,), {}))
  with pytest.raises(ValueError, match=match) as error:
    training_loops.compare(
        _classifier, sgd(), losses.SparseCategoricalCrossentropy(),
        bad.pop("data", classification_data()), **bad)
  assert "\n" not in str(error.value)


def test_research_compare_trace_prints_the_report_and_writes_nothing(
    tmp_path, capsys):
  output_dir = tmp_path / "run"
  compare_script.compare(
      "classify", classify.Config.resolved(loop="graph",
                                           output_dir=str(output_dir)),
      trace_loops=True, trace_steps=3)
  assert capsys.readouterr().out == (
      "graph and keras_fit agree over 3 steps: every loss and variable "
      "within rtol=1e-05, atol=1e-06 of graph's.\n")
  assert not output_dir.exists()
  with pytest.raises(SystemExit, match="error: --trace compares --loop "
                                       "with keras_fit"):
    compare_script.compare("classify",
                           classify.Config.resolved(loop="keras_fit"),
                           trace_loops=True)


def test_dropout_behind_batch_norm_agrees_to_the_bit_in_every_loop():
  """A compiled step's graph optimizer folds a division by a constant into
  a product by its reciprocal, 1 ulp apart in about one element in ten;
  batch norm amplifies it, and eager parted from the compiled loops at
  step 2 of a deep net. Dropout multiplies by the reciprocal itself, as
  tf.nn.dropout does: every loop agrees exactly."""
  def model_fn():
    stack = [keras.Input((4,))]
    for _ in range(4):
      stack += [layers.Dense(16, "relu"), layers.BatchNormalization(),
                layers.Dropout(0.2, seed=1)]
    return keras.Sequential([*stack, layers.Dense(3, "softmax")])
  report = training_loops.compare(
      model_fn, sgd(0.1), losses.SparseCategoricalCrossentropy(),
      classification_data(), steps=3, rtol=0.0, atol=0.0)
  assert report.agreed, str(report)
