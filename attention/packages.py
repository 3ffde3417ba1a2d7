"""This project's top-level package names (`attention`, `kernels`, `configs`, `lra`) are also used by others: PyPI has
huggingface's `kernels` (which `transformers` can pull in) and a Keras `attention`. Where both are installed, Python
imports whichever it finds first, and the failure surfaces far away (`No module named 'kernels.common'`) or not at
all. `check(names)` finds where each name resolves without importing it and raises one ImportError naming the
foreign package's path and the fix (install this project in its own virtual environment).

Standard library only, so that it runs before anything imports the names it checks: `attention/__init__.py` checks
`kernels`, and `lra/__init__.py` (imported first by `train.py`, `eval.py` and the scripts) checks all of them, loading
this file by its path (importing the `attention` package to reach it would import the foreign one).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("attention", "kernels", "configs", "lra")
# Each of this project's packages says so in its __init__.py (read as text, so nothing is imported to check it): a
# non-editable install of another package can overwrite files in the same site-packages folder.
MARKER = "efficient-attention"
MARKER_LINE = f'__project__ = "{MARKER}"'


def location(name: str) -> Path | None:
  """The `__init__.py` (or module file) the top-level import `name` resolves to; None if nothing provides it."""
  module = sys.modules.get(name)
  if module is not None:
    origin = getattr(module, "__file__", None)
  else:
    try:
      spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
      spec = None
    origin = spec.origin if spec is not None else None
    if spec is not None and origin in (None, "namespace") and spec.submodule_search_locations:
      origin = next(iter(spec.submodule_search_locations), None)  # a namespace package: its first folder
  return Path(origin).resolve() if origin else None


def _marked(name: str, found: Path) -> bool:
  module = sys.modules.get(name)
  if module is not None:
    return getattr(module, "__project__", None) == MARKER or MARKER_LINE in _text(found)
  return MARKER_LINE in _text(found)


def _text(path: Path) -> str:
  try:
    return path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError):
    return ""


def check(names: tuple[str, ...] = PROJECT_PACKAGES, *, root: Path = ROOT) -> None:
  """ImportError naming the clash if a name in `names` resolves to another package than this project's (the one
  under `root`, whose __init__.py holds `MARKER_LINE`)."""
  fix = (f"install this project in its own virtual environment (python -m venv .venv && .venv/bin/pip install -e "
         f"{root}), or uninstall the other package there")
  for name in names:
    found = location(name)
    if found is None:
      continue  # not installed at all: the import itself says so
    if not found.is_relative_to(root / name):
      raise ImportError(
          f"the package {name!r} imported here is not this project's: {found} (this project's is {root / name}); "
          f"another installed package uses the import name {name!r} (e.g. huggingface 'kernels', Keras "
          f"'attention'): {fix}")
    if not _marked(name, found):
      raise ImportError(
          f"the package {name!r} at {found} is not this project's: its __init__.py lacks the line {MARKER_LINE}, so "
          f"another package installed into the same folder replaced it (e.g. huggingface 'kernels', Keras "
          f"'attention'): {fix}")
