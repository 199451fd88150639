"""research.tools.parity: every Keras feature of its table in every loop agrees
with model.fit, and the table says so only when it is true."""

import keras

import training_loops
from research.tools import parity


def test_every_feature_agrees_with_model_fit_in_every_loop():
  rows = parity.parity_rows(examples=64, batch_size=16, epochs=2)
  assert [name for name, _ in rows] == [f.name for f in parity.FEATURES]
  for name, cells in rows:
    for loop in training_loops.LOOPS:
      if loop != "keras_fit":
        assert cells[loop].endswith(", ok"), (name, loop, cells[loop])
  table = parity.format_table(rows)
  assert table.count("\n") == len(rows) + 1 and "DIFFERS" not in table


class _HalveTheRateEachBatch(keras.callbacks.Callback):

  def on_train_batch_end(self, batch, logs=None):
    if getattr(self.model, "train_function", None) is not None:  # fit only
      rate = self.model.optimizer.learning_rate
      rate.assign(rate * 0.5)


def test_a_loop_that_differs_from_fit_is_reported():
  """A callback that acts only under fit (only fit makes the model's
  `train_function`) parts the eager loop's weights from fit's."""
  feature = parity.Feature("per-batch rate, fit only", lambda d: [
      _HalveTheRateEachBatch()])
  (_, cells), = parity.parity_rows([feature], loops=("eager", "keras_fit"),
                                   examples=64, batch_size=16, epochs=2)
  assert cells["eager"].endswith("DIFFERS"), cells
