"""Compute dtype of a model from its config name: the one vocabulary of `kernels.common.DTYPE_NAMES` ("float32",
"bfloat16", "float16", or "auto" = bfloat16 on GPU/TPU, float32 on CPU)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from kernels.common import DTYPE_NAMES, resolve_dtype as _resolve


def resolve_dtype(name: Any) -> jnp.dtype:
  """`config.model.dtype` -> the compute dtype (read against the default backend for "auto"); a jnp dtype passes
  through. ValueError naming the valid names otherwise."""
  if isinstance(name, str) and name not in DTYPE_NAMES:
    raise ValueError(f"unknown model dtype {name!r}; valid choices: {', '.join(DTYPE_NAMES)} "
                     f"(set config.model.dtype)")
  return _resolve(name)


__all__ = ["DTYPE_NAMES", "resolve_dtype"]
