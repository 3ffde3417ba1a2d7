"""Attention variants registered from outside the package join the contract suite.

`ATTENTION_PLUGINS=my_pkg.my_attention,other_module pytest tests/attention/test_contract.py` imports each named module
before the suite is collected; a module that registers a variant (`@attention.register("mine")`) is then checked like
the built-in ones (test ids `test_...[mine]`). pytest's own `-p my_pkg.my_attention` does the same for one module.
"""

from __future__ import annotations

import importlib
import os

PLUGINS_ENV = "ATTENTION_PLUGINS"


def _import_plugins() -> None:
  for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ImportError(f"{PLUGINS_ENV} names module {module!r}, which cannot be imported ({e}); fix the name or "
                        f"PYTHONPATH") from e


_import_plugins()
