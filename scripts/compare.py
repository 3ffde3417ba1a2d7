r"""Alias of scripts/sweep.py for attention variants side by side: `--attention=a,b` is
`--axis model.attention.name=a,b`; every other flag is sweep.py's.

  python scripts/compare.py --config configs/lra/listops.py:runlocal --attention=softmax,linear,performer \
      --workdir runs/compare_listops
  # is the same as
  python scripts/sweep.py --config configs/lra/listops.py:runlocal --workdir runs/compare_listops \
      --axis model.attention.name=softmax,linear,performer

The table is `<workdir>/results.md` and `results.csv` (one row per variant: validation / test metrics, parameter
count, training steps/s).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def translate(argv: list[str]) -> list[str]:
  """compare.py's command line as sweep.py's (`--attention=a,b` or `--attention a,b` -> `--axis=...name=a,b`)."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg in ("--attention", "-attention") and i + 1 < len(argv):
      out.append(f"--axis=model.attention.name={argv[i + 1]}")
      i += 2
      continue
    if arg.startswith(("--attention=", "-attention=")):
      arg = "--axis=model.attention.name=" + arg.split("=", 1)[1]
    out.append(arg)
    i += 1
  return out


if __name__ == "__main__":
  sweep = Path(__file__).resolve().with_name("sweep.py")
  sys.argv = [str(sweep), *translate(sys.argv[1:])]
  runpy.run_path(str(sweep), run_name="__main__")
