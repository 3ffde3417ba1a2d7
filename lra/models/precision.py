"""Compute dtype of a model from its config name: "float32", "bfloat16", or "auto" (bfloat16 on GPU/TPU)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import attention

DTYPE_NAMES = ("float32", "bfloat16", "auto")


def resolve_dtype(name: Any) -> jnp.dtype:
  """`config.model.dtype` -> the compute dtype; "auto" is bfloat16 when the default backend is a GPU or TPU (where
  bfloat16 matmuls run at full rate and the Pallas kernels take it) and float32 on CPU. A jnp dtype passes through."""
  if isinstance(name, str) and name not in DTYPE_NAMES and name not in attention.base.DTYPES:
    raise ValueError(f"unknown model dtype {name!r}; valid choices: {', '.join(DTYPE_NAMES)} "
                     f"(set config.model.dtype)")
  if name == "auto":
    return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
  return attention.resolve_compute_dtype(name)
