"""`python -m research <experiment or tool> [--flags]`; without a name,
lists them."""

import importlib
import runpy
import sys

from research import EXPERIMENTS, RENAMED, TOOLS


def _package(name):
  return "experiments" if name in EXPERIMENTS else "tools"


def _listing():
  lines = ["usage: python -m research <name> [--flags]  (--helpfull: a "
           "name's flags)", ""]
  for title, names in (("experiments", EXPERIMENTS), ("tools", TOOLS)):
    lines.append(f"{title}:")
    for name in names:
      module = importlib.import_module(f"research.{_package(name)}.{name}")
      summary = ((module.__doc__ or "").strip().splitlines() or [""])[0]
      lines.append(f"  {name:15} {summary}")
    lines.append("")
  return "\n".join(lines)


def main():
  if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
    print(_listing())
    return
  name = sys.argv[1]
  if name in RENAMED:
    sys.exit(f"error: {name} is called {RENAMED[name]} now: python -m "
             f"research {RENAMED[name]}")
  if name not in EXPERIMENTS + TOOLS:
    sys.exit(f"error: no experiment or tool {name!r}; accepted: "
             f"{', '.join(EXPERIMENTS + TOOLS)}.")
  del sys.argv[1]  # runpy makes the module's path argv[0]
  runpy.run_module(f"research.{_package(name)}.{name}", run_name="__main__",
                   alter_sys=True)


if __name__ == "__main__":
  main()
