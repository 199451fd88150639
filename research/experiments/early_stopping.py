"""The classifier with TensorBoard, best-model checkpoints, early stopping.

Our callbacks in the custom loops, Keras' own in model.fit.

    python -m research early_stopping --epochs=100 --patience=5
    tensorboard --logdir runs/early_stopping/logs
"""

import dataclasses
import functools
import os

import keras

import losses
import training_loops
from research.experiments import classify
from research.framework import datasets, experiment, models, run_config

@dataclasses.dataclass(frozen=True)
class Config(run_config.RunConfig):
  dataset: str = "digits"
  epochs: int = 100
  patience: int = run_config.setting(5, "EarlyStopping patience (epochs).",
                                     at_least=0)



def stopping_callbacks(loop, output_dir, patience):
  """[early stopping, best-model checkpoint] on val_loss."""
  best_path = os.path.join(output_dir, "best", f"{loop}.weights.h5")
  if loop == "keras_fit":
    return [keras.callbacks.EarlyStopping(patience=patience,
                                          restore_best_weights=True),
            keras.callbacks.ModelCheckpoint(best_path, save_best_only=True,
                                            save_weights_only=True)]
  return [training_loops.EarlyStopping(patience=patience,
                                       restore_best_weights=True),
          training_loops.BestModelCheckpoint(best_path)]


def stopping_report(history, callbacks):
  stopper = callbacks[0]
  stopped = stopper.stopped_epoch if stopper.model.stop_training else None
  return {"stopped_epoch": stopped, "epochs_run": len(history.epochs),
          "best_val_loss": min(history.history["val_loss"])}


def build(config):
  splits = datasets.load_for("classification", config)
  return experiment.Experiment(
      name="early_stopping", splits=splits,
      model_fn=lambda: models.mlp_classifier(splits.x_train,
                                             splits.num_classes),
      loss=losses.SparseCategoricalCrossentropy(),
      metrics=[classify.accuracy()],
      callbacks=functools.partial(stopping_callbacks,
                                  patience=config.patience),
      loop_report=stopping_report, extra={"patience": config.patience})


main = experiment.main_for(build)

if __name__ == "__main__":
  run_config.run_cli(Config, main)
