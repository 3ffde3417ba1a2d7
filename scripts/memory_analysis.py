"""Compiled-memory figures from XLA without running anything: `jit(f).lower(*shapes).compile().memory_analysis()`.

Deterministic on CPU, so memory claims can be checked anywhere. Shared by the benchmark scripts in this folder.
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def compiled_memory(f: Callable[..., Any], *shapes: jax.ShapeDtypeStruct) -> dict[str, int]:
  """Bytes XLA plans for `jax.jit(f)` on `shapes`: temporaries, arguments, outputs and their total."""
  analysis = jax.jit(f).lower(*shapes).compile().memory_analysis()
  out = {"temp": analysis.temp_size_in_bytes, "argument": analysis.argument_size_in_bytes,
         "output": analysis.output_size_in_bytes}
  out["total"] = out["temp"] + out["argument"] + out["output"]
  return out


def mib(n: int) -> str:
  return f"{n / 2**20:,.1f} MiB"
