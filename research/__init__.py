"""Experiments reproducing a classic tf.keras course and generative papers
with every training loop, the framework they share, and the tools that
check the loops (benchmark, parity, lockstep traces, the report).

    python -m research                 # lists the experiments and tools
    python -m research classify --dataset=mnist --data_dir=...
"""

import importlib.abc
import sys

EXPERIMENTS = ("classify", "regress", "deep_net", "wide_deep",
               "early_stopping", "hparam_search", "vae", "gan", "distill")
TOOLS = ("compare", "benchmark", "peers", "parity", "report", "evaluate",
         "soak")

# Experiments and tools whose name changed when they moved into packages.
RENAMED = {"callbacks": "early_stopping"}


class _MovedCommand(importlib.abc.MetaPathFinder):
  """Refuses `research.<name>` for a name that now lives in a package, in
  one line naming the command to run instead. Consulted after every other
  finder, so it only sees names nothing else can import."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    package, _, name = fullname.rpartition(".")
    name = RENAMED.get(name, name)
    if package == __name__ and name in EXPERIMENTS + TOOLS:
      raise ImportError(f"{fullname} is run as `python -m research {name}` "
                        "now.")
    return None


if not any(isinstance(finder, _MovedCommand) for finder in sys.meta_path):
  sys.meta_path.append(_MovedCommand())
