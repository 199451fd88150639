"""`CallbackState`: what the callbacks learned over the epochs (early
stopping's patience and best weights, the best value a best-model
checkpoint saw), saved in every checkpoint so that a resumed run stops, and
keeps the best model, where an uninterrupted one does.

    from training_loops import callback_state
    callback_state.register(MyCallback, ["best", "wait"])
"""

import io
import json

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from training_loops.callbacks import BestModelCheckpoint, EarlyStopping

# Per callback class, the attributes a resumed run needs back. Keras'
# `EarlyStopping` and ours reset theirs in `on_train_begin`; `ModelCheckpoint`
# and `BestModelCheckpoint` set `best` once, in `__init__`;
# `ReduceLROnPlateau` resets its own in `on_train_begin` too.
_RESUMABLE = {
    EarlyStopping: ("best", "best_epoch", "wait", "stopped_epoch",
                    "best_weights"),
    BestModelCheckpoint: ("best", "best_epoch"),
    keras.callbacks.EarlyStopping: ("wait", "stopped_epoch", "best",
                                    "best_epoch", "best_weights"),
    keras.callbacks.ModelCheckpoint: ("best",),
    # The learning rate it lowered is the optimizer's, checkpointed anyway.
    keras.callbacks.ReduceLROnPlateau: ("best", "wait", "cooldown_counter"),
}


def register(callback_class, attributes):
  """Saves `attributes` of every `callback_class` callback (and of its
  subclasses that are not registered themselves) with each checkpoint, and
  sets them again on resume, after `on_train_begin`.

  Args:
    callback_class: a `keras.callbacks.Callback` subclass.
    attributes: attribute names. Each must hold None, a bool, number or
      string (or JSON lists and dicts of them), or a list of NumPy arrays,
      as `model.get_weights()` returns.
  """
  if isinstance(attributes, str):
    raise TypeError(f"attributes must be a list of names, not the string "
                    f"{attributes!r}.")
  _RESUMABLE[callback_class] = tuple(attributes)


class CallbackState(tf.train.experimental.PythonState):
  """The registered attributes of a run's callbacks, and whether one of them
  had stopped the run (`model.stop_training`), as one string in the
  checkpoint.

  Restoring a checkpoint only reads them (`deserialize`); `apply` sets them
  on the callbacks, after `on_train_begin`, which resets early stopping.
  Callbacks are matched by their index in the list and their class.
  """

  def __init__(self, callbacks, model):
    self._callbacks, self._model = tuple(callbacks), model
    self._restored = None

  @property
  def stopped(self):
    """Whether the restored checkpoint was saved after a callback had
    stopped the run."""
    return self._restored is not None and self._restored["stop_training"]

  def serialize(self):
    entries, arrays = [], {}
    for index, callback in enumerate(self._callbacks):
      names = _resumable_attributes(type(callback))
      if not names:
        continue
      values, dtypes = {}, {}
      for name in names:
        value = getattr(callback, name)
        if _is_arrays(value):
          # By name: npz keeps NumPy's own dtypes only, and a bfloat16
          # array would come back as raw bytes.
          dtypes[name] = [array.dtype.name for array in value]
          arrays.update({f"{index}.{name}.{i}": array
                         for i, array in enumerate(value)})
        else:
          values[name] = value
      entries.append({"index": index, "class": _class_name(callback),
                      "values": values, "dtypes": dtypes})
    meta = json.dumps({"stop_training": bool(self._model.stop_training),
                       "callbacks": entries}, default=_json_scalar)
    stream = io.BytesIO()
    np.savez(stream, allow_pickle=False, meta=np.array(meta), **arrays)
    return stream.getvalue()

  def deserialize(self, string_value):
    with np.load(io.BytesIO(string_value), allow_pickle=False) as saved:
      restored = json.loads(saved["meta"].item())
      for entry in restored["callbacks"]:
        for name, dtypes in entry.pop("dtypes").items():
          entry["values"][name] = [
              saved[f"{entry['index']}.{name}.{i}"].view(
                  tf.as_dtype(dtype).as_numpy_dtype)
              for i, dtype in enumerate(dtypes)]
    self._restored = restored

  def apply(self):
    """Gives the callbacks the restored attributes, if a checkpoint was
    restored; a callback whose class differs from the saved one's keeps its
    own, with a warning."""
    for entry in self._restored["callbacks"] if self._restored else ():
      index = entry["index"]
      now = (_class_name(self._callbacks[index])
             if index < len(self._callbacks) else "missing")
      if now != entry["class"]:
        logging.warning(
            "Callback %d was %s when the checkpoint was saved and is %s "
            "now: its state (%s) is not restored.", index, entry["class"],
            now, ", ".join(entry["values"]))
        continue
      for name, value in entry["values"].items():
        setattr(self._callbacks[index], name, value)


def _resumable_attributes(callback_class):
  for cls in callback_class.__mro__:
    if cls in _RESUMABLE:
      return _RESUMABLE[cls]
  return ()


def _class_name(callback):
  return f"{type(callback).__module__}.{type(callback).__qualname__}"


def _is_arrays(value):
  return isinstance(value, (list, tuple)) and bool(value) and all(
      isinstance(item, np.ndarray) for item in value)


def _json_scalar(value):
  if isinstance(value, np.generic):  # e.g. a float32 read from the logs
    return value.item()
  raise TypeError(f"callback state must be None, a bool, number or string, "
                  f"or a list of NumPy arrays; got a {type(value).__name__}.")
