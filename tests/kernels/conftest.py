"""Marks the tests that lower or export programs for other platforms (`-m export`): `.ci/run` runs them a second
time under jax 0.11 (Python 3.12), since the accelerator machines run 0.11 and it traces some calls inside kernels
differently from the 0.10 that Python 3.11 gets. And compiles this folder's programs with LLVM's expensive passes off.
"""

from __future__ import annotations

import jax
import pytest

_EXPORT_WORDS = ("export", "lowering", "lower_for")


def pytest_collection_modifyitems(items):
  for item in items:
    if any(word in item.nodeid.lower() for word in _EXPORT_WORDS):
      item.add_marker(pytest.mark.export)


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """Tiny programs, compiled once each: `jax_disable_most_optimizations` adds LLVM's expensive passes off to the
  session's backend optimization level 0 (tests/conftest.py). One A/B under load measured test_flex.py at 35 -> 29
  CPU-s; the same flag on attention/encoder modules showed no gain (noise either way), so it stays local to this folder.
  Those passes change no buffer (memory figures are buffer assignment's, before LLVM) and no float result (no fast
  math: LLVM may not reorder float arithmetic); exports are not compiled."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
