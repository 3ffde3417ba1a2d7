"""The experiment library: models (one encoder, heads), tasks (data, metrics) and training (loop, checkpoints)."""

__project__ = "efficient-attention"  # this project's package, not another of the same name (attention/packages.py)

import importlib.util as _importlib_util
from pathlib import Path as _Path


def _check_packages() -> None:
  """This project's `attention`, `kernels` and `configs` must be the ones imported (attention/packages.py): other
  installed packages use those names. The checker is loaded by its path: importing the `attention` package to reach
  it would import whichever `attention` comes first."""
  path = _Path(__file__).resolve().parents[1] / "attention" / "packages.py"
  spec = _importlib_util.spec_from_file_location("lra._packages", path)
  module = _importlib_util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.check()


_check_packages()
