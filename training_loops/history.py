"""What a training run returns, the same for every loop."""

import dataclasses
import json
import os

from training_loops.atomic import write_json_atomically


@dataclasses.dataclass
class History:
  """Per-epoch results of `train`.

  Attributes:
    history: Keras' keys (`loss`, each metric's name, `val_loss`,
      `val_<name>`; `<output>_loss` for multi-output models) -> one value per
      epoch run in this call.
    epochs: the epoch index of each entry (a resumed run starts past 0).
    steps_per_second: training steps per second of each epoch, validation
      excluded.
    wall_seconds: wall time of each epoch, validation included.
    step_history: with `eval_every_steps`, the validations by training
      step counted over the run: `step`, `epoch` and Keras' `val_*` keys ->
      one value per validation.
    model: the trained model.
    resumed_from: `{"epoch": E, "step": S}`, the position of the checkpoint
      this call restored (S steps into epoch E), or None: it started from
      scratch.
    steps_trained: the training steps this call ran (a resumed call counts
      only its own).
  """
  history: dict = dataclasses.field(default_factory=dict)
  epochs: list = dataclasses.field(default_factory=list)
  steps_per_second: list = dataclasses.field(default_factory=list)
  wall_seconds: list = dataclasses.field(default_factory=list)
  step_history: dict = dataclasses.field(default_factory=dict)
  model: object = None
  resumed_from: dict | None = None
  steps_trained: int = 0

  def append(self, epoch, logs, steps_per_second, wall_seconds):
    self.epochs.append(epoch)
    for key, value in logs.items():
      self.history.setdefault(key, []).append(float(value))
    self.steps_per_second.append(steps_per_second)
    self.wall_seconds.append(wall_seconds)

  def append_step(self, step, epoch, logs):
    for key, value in {"step": step, "epoch": epoch, **logs}.items():
      self.step_history.setdefault(key, []).append(value)

  def to_json(self):
    return {"history": self.history, "epochs": self.epochs,
            "steps_per_second": self.steps_per_second,
            "wall_seconds": self.wall_seconds,
            "step_history": self.step_history}

  def save(self, path):
    """Writes the epochs so far to `path` atomically."""
    write_json_atomically(path, self.to_json())

  def load(self, path, epochs_done, steps_done):
    """Restores the first `epochs_done` epochs and the step validations up
    to step `steps_done` saved at `path`, if any.

    The history is saved before the checkpoint, so after a crash between
    the two it may hold more than the checkpoint: dropped here.
    """
    if not os.path.isfile(path):
      return
    with open(path, encoding="utf-8") as stream:
      saved = json.load(stream)
    keep = [i for i, epoch in enumerate(saved["epochs"]) if epoch < epochs_done]
    self.epochs = [saved["epochs"][i] for i in keep]
    self.history = {key: [values[i] for i in keep]
                    for key, values in saved["history"].items()}
    self.steps_per_second = [saved["steps_per_second"][i] for i in keep]
    self.wall_seconds = [saved["wall_seconds"][i] for i in keep]
    by_step = saved.get("step_history", {})
    keep = [i for i, step in enumerate(by_step.get("step", []))
            if step <= steps_done]
    self.step_history = {key: [values[i] for i in keep]
                         for key, values in by_step.items()}
