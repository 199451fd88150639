"""Checkpoints and resume: a resumed run ends as an uninterrupted one; a
checkpoint of another model is refused by name."""

import keras
import pytest

import layers
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


def test_checkpoint_of_another_model_is_named_not_half_restored(tmp_path):
  run_loop("graph", epochs=1, model_fn=classifier, checkpoint_dir=tmp_path)
  wider = lambda: keras.Sequential([keras.Input((4,)), layers.Dense(9, "relu"),
                                    layers.Dense(3, "softmax")])
  with pytest.raises(training_loops.CheckpointMismatchError,
                     match=r"different model \(.*\[4, 8\] float32 saved, "
                           r"\[4, 9\] float32 now"):
    run_loop("graph", epochs=2, model_fn=wider, checkpoint_dir=tmp_path)
