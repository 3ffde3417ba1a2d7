"""Plugins: attention variants (and flex mask / score functions) registered from a researcher's own modules.

`ATTENTION_PLUGINS=my_attention,lab.masks` (comma-separated module names, importable from `sys.path` /
`PYTHONPATH`) names modules that register with the package's decorators: `@attention.register("mine")` for a variant
(a flax.linen or flax.nnx module), and the flex variant's mask / score registries for mask and score functions. The
`attention` package imports each named module once, at the end of its own import (after the built-in variants and
registries exist), so every process that can build a layer knows the plugins: `train.py`, `eval.py`, the scripts,
sweep points, the subprocesses tests start, and the contract suite. Tasks have the same mechanism (`TASK_PLUGINS`,
`lra.tasks.registry`), built on `import_modules` below.
"""

from __future__ import annotations

import importlib
import os

PLUGINS_ENV = "ATTENTION_PLUGINS"


def import_modules(variable: str, value: str | None = None) -> list[str]:
  """Imports each module named in `value` (default: the environment variable `variable`), in order; their names.

  A module that cannot be imported is a one-line ValueError naming it, the variable and the fix. Errors other than
  ImportError raised by a plugin's own code propagate with their traceback (a bug in the plugin).
  """
  value = os.environ.get(variable, "") if value is None else value
  modules = [m.strip() for m in value.split(",") if m.strip()]
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError as e:
      reason = " ".join(str(e).split())
      not_found = isinstance(e, ModuleNotFoundError) and e.name is not None and module.startswith(e.name)
      fix = (f"fix the name in {variable} or add its folder to PYTHONPATH" if not_found else
             "fix that import in the plugin module (its traceback: the error's cause)")
      raise ValueError(f"{variable} names module {module!r}, which cannot be imported ({reason}); {fix}") from e
  return modules


def import_plugins(value: str | None = None) -> list[str]:
  """Imports the modules named in `ATTENTION_PLUGINS` (or in `value`); their names."""
  return import_modules(PLUGINS_ENV, value)
