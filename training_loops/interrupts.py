"""SIGINT and SIGTERM as requests to stop at the next step boundary."""

import signal
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
  """Training stopped on a signal after saving what it had.

  Attributes:
    signal_name: "SIGINT" or "SIGTERM".
    epoch, step: where it stopped (0-based epoch; steps done in it).
    history: the `History` of the epochs completed so far.
  """

  def __init__(self, signal_number, epoch, step, history, saved):
    self.signal_name = signal.Signals(signal_number).name
    self.signal_number = signal_number
    self.epoch, self.step, self.history = epoch, step, history
    kept = ("checkpoint saved; run again with the same checkpoint_dir to "
            "resume" if saved else "no checkpoint_dir: nothing saved")
    super().__init__(f"Interrupted by {self.signal_name} at epoch {epoch} "
                     f"(0-based), step {step}: {kept}.")


class StopRequests:
  """While active, the first SIGINT/SIGTERM only records a request, which
  the loops honour at their next step boundary; a second one interrupts at
  once (KeyboardInterrupt), for a run that must die now.

  Signal handlers can only be set from the main thread; elsewhere this does
  nothing and signals keep their usual effect.
  """

  def __init__(self):
    self.signal_number = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for number in _SIGNALS:
        self._previous[number] = signal.signal(number, self._request)
    return self

  def __exit__(self, *exc_info):
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous.clear()

  @property
  def requested(self):
    return self.signal_number is not None

  def _request(self, number, frame):
    del frame
    if self.requested:
      raise KeyboardInterrupt
    self.signal_number = number
