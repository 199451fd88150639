"""research.parity: every Keras feature of its table in every loop agrees
with model.fit, and the table says so only when it is true."""

import keras

import training_loops
from research import parity


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
    rate = self.model.optimizer.learning_rate
    rate.assign(rate * 0.5)


def test_a_loop_that_differs_from_fit_is_reported():
  """The graph loop's default runs an epoch a call, so a per-batch
  callback runs once an epoch there: not what fit (one step a call) does."""
  feature = parity.Feature("per-batch rate", lambda d: [
      _HalveTheRateEachBatch()])
  (_, cells), = parity.parity_rows([feature], loops=("graph", "keras_fit"),
                                   examples=64, batch_size=16, epochs=2)
  assert cells["graph"].endswith("DIFFERS"), cells
