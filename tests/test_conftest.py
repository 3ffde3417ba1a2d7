"""The suite's own settings (tests/conftest.py) name what exists."""

import pathlib

from tests import conftest


def test_every_cpu_only_module_exists_and_exports_nothing():
  """A renamed module would silently fall back to staging every platform; one that exports must not be listed (a
  function it first ran on CPU would be exported from its CPU-only trace)."""
  root = pathlib.Path(conftest.__file__).resolve().parents[1]
  for name in sorted(conftest.CPU_ONLY_MODULES):
    path = root / (name.replace(".", "/") + ".py")
    assert path.exists(), f"CPU_ONLY_MODULES names {name}, which does not exist"
    text = path.read_text(encoding="utf-8")
    assert "jax.export" not in text and "make_jaxpr" not in text, f"{name} exports or inspects a trace"
