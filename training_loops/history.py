"""What a training run returns, the same for every loop."""

import dataclasses


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
    model: the trained model.
  """
  history: dict = dataclasses.field(default_factory=dict)
  epochs: list = dataclasses.field(default_factory=list)
  steps_per_second: list = dataclasses.field(default_factory=list)
  wall_seconds: list = dataclasses.field(default_factory=list)
  model: object = None

  def append(self, epoch, logs, steps_per_second, wall_seconds):
    self.epochs.append(epoch)
    for key, value in logs.items():
      self.history.setdefault(key, []).append(float(value))
    self.steps_per_second.append(steps_per_second)
    self.wall_seconds.append(wall_seconds)
