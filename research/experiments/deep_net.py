"""A 20-layer MLP: vanishing gradients, SELU, batch normalization, dropout.

Twenty Dense(100) layers: the course's lesson on vanishing gradients,
SELU self-normalization, batch normalization and dropout. Reports test
accuracy and, per hidden layer, the kernel-gradient norm over the first
batches at initialization (vanishing gradients show as norms shrinking
towards the input).

    python -m research deep_net --activation=selu --dropout=alpha
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

import losses
from research.experiments import classify
from research.framework import datasets, experiment, models, run_config

@dataclasses.dataclass(frozen=True)
class Config(run_config.RunConfig):
  dataset: str = "digits"
  epochs: int = 10
  activation: str = run_config.setting(
      "relu", "Hidden activation (selu uses LeCun-normal init).",
      choices=("relu", "selu"))
  batchnorm: bool = run_config.setting(
      False, "BatchNormalization after each hidden layer.")
  dropout: str = run_config.setting(
      "none", "Dropout before the softmax: standard, or alpha (SELU).",
      choices=("none", "standard", "alpha"))
  gradient_batches: int = run_config.setting(
      3, "Batches for the gradient-norm report.", at_least=1)



def initial_gradient_norms(model_fn, loss, splits, batch_size, batches,
                           seed):
  """`{hidden layer: [kernel-gradient L2 norm per batch]}` at the same
  initialization the training runs start from."""
  keras.utils.set_random_seed(seed)
  model = model_fn()
  hidden = [layer for layer in model.layers
            if layer.name.startswith("hidden_")]
  norms = {layer.name: [] for layer in hidden}
  for start in range(0, batches * batch_size, batch_size):
    x = splits.x_train[start:start + batch_size]
    y = splits.y_train[start:start + batch_size]
    with tf.GradientTape() as tape:
      value = loss(y, model(x, training=True))
    gradients = tape.gradient(value, [layer.kernel for layer in hidden])
    for layer, gradient in zip(hidden, gradients):
      norms[layer.name].append(float(tf.norm(gradient)))
  return norms


def build(config):
  splits = datasets.load_for("classification", config)

  def model_fn():
    return models.deep_classifier(
        splits.x_train, splits.num_classes, config.activation,
        config.batchnorm, config.dropout, seed=config.seed)

  loss = losses.SparseCategoricalCrossentropy()
  norms = initial_gradient_norms(model_fn, loss, splits,
                                 config.batch_size,
                                 config.gradient_batches, config.seed)
  print("kernel-gradient norms at initialization (mean of "
        f"{config.gradient_batches} batches), input side first:")
  print("  " + " ".join(f"{np.mean(v):.2e}" for v in norms.values()))
  return experiment.Experiment(
      name="deep_net", splits=splits, model_fn=model_fn, loss=loss,
      metrics=[classify.accuracy()],
      extra={"gradient_norms": norms,
             "architecture": {"activation": config.activation,
                              "batchnorm": config.batchnorm,
                              "dropout": config.dropout}})


main = experiment.main_for(build)

if __name__ == "__main__":
  run_config.run_cli(Config, main)
