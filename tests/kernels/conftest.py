"""Marks the tests that lower or export programs for other platforms (`-m export`): `.ci/run` runs them a second
time under jax 0.11 (Python 3.12), since the accelerator machines run 0.11 and it traces some calls inside kernels
differently from the 0.10 that Python 3.11 gets."""

from __future__ import annotations

import pytest

_EXPORT_WORDS = ("export", "lowering", "lower_for")


def pytest_collection_modifyitems(items):
  for item in items:
    if any(word in item.nodeid.lower() for word in _EXPORT_WORDS):
      item.add_marker(pytest.mark.export)
