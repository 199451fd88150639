"""What every research run reports beside its learning curves.

`model_summary` describes the model for results.json, `confusion_matrix`
and `plot_confusion_matrix` a classifier's test predictions, and
`log_hparams` records a run's flags and final figures as one TensorBoard
HParams session, so any set of runs compares in TensorBoard's HParams tab.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

import training_loops

# The hparam values TensorBoard's HParams API accepts (it converts NumPy
# scalars itself); `log_hparams` writes any other value as its string.
_HPARAM_TYPES = (bool, int, float, str, np.bool_, np.number)

# Above this many classes the cells are too small to print counts in.
_MAX_ANNOTATED_CLASSES = 20


def model_summary(model):
  """The parameter counts and layers of a built Keras model, as JSON.

  The counts are those `model.summary()` prints: every variable once, even
  when layers share it, counted in elements whatever its dtype; the
  dropout layers' seed state is not a weight, so it is not counted.

  Args:
    model: a built `keras.Model` (functional, Sequential or subclassed).

  Returns:
    `{"trainable_parameters": int, "non_trainable_parameters": int,
    "layers": [{"name", "type", "output_shape", "parameters"}]}`, a row per
    layer of `model.layers`. `output_shape` is a list, None for the batch
    and for other unknown dimensions, a list of such lists for a layer with
    several outputs, or None when the layer was never called on symbolic
    inputs (a subclassed model's layers); `parameters` is 0 for a layer
    that was never built.
  """
  return {
      "trainable_parameters": _count(model.trainable_weights),
      "non_trainable_parameters": _count(model.non_trainable_weights),
      "layers": [{"name": layer.name, "type": type(layer).__name__,
                  "output_shape": _output_shape(layer),
                  "parameters": layer.count_params() if layer.built else 0}
                 for layer in model.layers]}


def _count(weights):
  # Keras' lists already hold each variable once.
  return sum(math.prod(weight.shape) for weight in weights)


def _output_shape(layer):
  try:
    outputs = layer.output  # of its first call, for a shared layer
  except AttributeError:  # never called symbolically
    return None
  # None for the batch: a Sequential model built by a call on data has that
  # batch's size in its graph, yet takes any.
  shapes = [[None, *tensor.shape[1:]]
            for tensor in keras.tree.flatten(outputs)]
  return shapes[0] if len(shapes) == 1 else shapes


def confusion_matrix(model, dataset, num_classes):
  """Counts of (true label, predicted class) over `dataset`.

  Args:
    model: a classifier whose single output is `[batch, num_classes]`
      scores; the predicted class is their argmax.
    dataset: a batched `tf.data.Dataset` of `(x, y)`, `x` what the model
      takes (a tensor, tuple or dict) and `y` integer labels `[batch]` or
      `[batch, 1]`.
    num_classes: the number of classes.

  Returns:
    `num_classes` rows (true labels) of `num_classes` counts (predicted
    classes), as Python ints.
  """
  # The whole pass in one function: one trace, and no Python per batch.
  def count():
    matrix = tf.zeros([num_classes, num_classes], tf.int64)
    for x, y in dataset:
      predicted = tf.argmax(model(x, training=False), axis=-1)
      matrix += tf.math.confusion_matrix(tf.reshape(y, [-1]), predicted,
                                         num_classes, dtype=tf.int64)
    return matrix
  return training_loops.step.own_function(count)().numpy().tolist()


def plot_confusion_matrix(matrix, path, title):
  """Draws `matrix` (rows: true labels, columns: predictions) as a PNG at
  `path`, with the counts in the cells for up to 20 classes; skipped when
  matplotlib (the `plot` extra) is not installed."""
  try:
    from matplotlib import figure as matplotlib_figure
  except ImportError:
    return
  matrix = np.asarray(matrix)
  classes = len(matrix)
  size = 2.5 + 0.25 * min(classes, _MAX_ANNOTATED_CLASSES)
  # A Figure of its own rather than pyplot's: nothing global to switch to
  # Agg (saving a PNG uses it) or to close afterwards.
  figure = matplotlib_figure.Figure(figsize=(size + 1, size))
  axes = figure.subplots()
  image = axes.imshow(matrix, cmap="Blues")
  figure.colorbar(image, ax=axes)
  axes.set(xlabel="predicted", ylabel="true", title=title)
  if classes <= _MAX_ANNOTATED_CLASSES:
    axes.set(xticks=range(classes), yticks=range(classes))
    threshold = matrix.max() / 2
    for (true, predicted), count in np.ndenumerate(matrix):
      axes.text(predicted, true, str(count), ha="center", va="center",
                fontsize=8,
                color="white" if count > threshold else "black")
  figure.tight_layout()
  with training_loops.replaced_atomically(path) as temporary:
    figure.savefig(temporary, dpi=80)


def log_hparams(log_dir, hparams, metrics):
  """Writes one TensorBoard HParams session to `log_dir`.

  Args:
    log_dir: the session's directory; sessions compare when they sit under
      one `tensorboard --logdir`.
    hparams: `{name: value}`, e.g. a run's flags. bool, int, float and str
      values are kept; any other (None, a list) is written as its `str`,
      since the HParams API takes no other type.
    metrics: `{name: number}`, the session's metrics: each a scalar at
      step 0.

  Raises:
    training_loops.WriteError: the session could not be written.
  """
  with training_loops.writing(log_dir):
    training_loops.make_directory(log_dir)
    writer = tf.summary.create_file_writer(log_dir)
    try:
      with writer.as_default():
        hparams_api.hparams({
            name: value if isinstance(value, _HPARAM_TYPES) else str(value)
            for name, value in hparams.items()})
        for name, value in metrics.items():
          tf.summary.scalar(name, value, step=0)
    finally:
      writer.close()
