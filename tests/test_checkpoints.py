"""Checkpoints and resume: a resumed run ends as an uninterrupted one."""

import keras
import pytest

import training_loops
from loop_models import (assert_same_run, classification_data, classifier,
                         run_loop)


@pytest.mark.parametrize("loop", training_loops.LOOPS)
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(loop, tmp_path):
  def run(epochs, checkpoint_dir=None):
    keras.utils.set_random_seed(3)  # the shuffle order depends on it
    data = classification_data(shuffle=True)  # reshuffled every epoch
    return run_loop(loop, epochs=epochs, data=data,
                    checkpoint_dir=checkpoint_dir,
                    model_fn=lambda: classifier(dropout_seed=5))

  uninterrupted = run(4)
  run(2, tmp_path)  # "stopped" after epoch 2
  resumed = run(4, tmp_path)
  assert resumed.epochs == [0, 1, 2, 3]  # epochs 0-1 from the first call
  assert_same_run(resumed, uninterrupted, rtol=1e-5, atol=1e-6)
  assert len(run(4, tmp_path).epochs) == 4  # already done: nothing to run
