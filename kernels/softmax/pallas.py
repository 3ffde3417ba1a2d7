"""Softmax attention through the project's Pallas flash kernels: the block-sparse kernels with a full (or causal)
layout are flash kernels (online softmax over key tiles, the hash dropout of `kernels.common` regenerated in their
backward), so softmax runs them on GPU (Mosaic GPU, Hopper) and TPU rather than keeping kernels of its own.

They serve self-attention (queries and keys of one length, a multiple of a layout block), without an ALiBi bias, in
the dtypes and head dims `kernels.block_sparse` takes; `kernel_or_reason` says why a call is outside that, and
`kernels.softmax.softmax_attention` then falls back to the XLA flash form (logged once with that reason).
"""

from __future__ import annotations

import functools
import inspect

import jax
import numpy as np

from kernels.platform import Backend

# Layout blocks tried, largest first: a full layout of few blocks keeps the kernels' index tables small; the kernel
# tiles (64 on GPU, up to 128 on TPU) are chosen inside the layout blocks by `kernels.block_sparse`.
BLOCK_SIZES = (512, 256, 128, 64, 32, 16, 8)


def block_size_for(length: int) -> int | None:
  """The layout block of a `length`-token call, or None when no candidate divides it."""
  return next((b for b in BLOCK_SIZES if length % b == 0), None)


def _layout(length: int, block_size: int, causal: bool) -> np.ndarray:
  n = length // block_size
  full = np.ones((1, n, n), bool)
  return np.tril(full) if causal else full


@functools.cache
def _mask_keyword() -> str:
  """The key-padding keyword of `kernels.block_sparse.block_sparse_attention` (`key_mask`, formerly `kv_mask`)."""
  from kernels.block_sparse import block_sparse_attention  # noqa: PLC0415
  return "key_mask" if "key_mask" in inspect.signature(block_sparse_attention).parameters else "kv_mask"


def call_reason(q_shape, k_shape, alibi_slopes) -> str | None:
  """Why no kernel can serve the call whatever the backend (None when the shapes fit)."""
  if tuple(q_shape[:2]) != tuple(k_shape[:2]) or q_shape[2] != k_shape[2]:
    return (f"queries {tuple(q_shape)} and keys {tuple(k_shape)} differ in batch, length or heads (decoding, "
            f"cross-attention): the kernels take self-attention")
  if alibi_slopes is not None:
    return "alibi_slopes: the kernels add no positional bias"
  if block_size_for(q_shape[1]) is None:
    return f"length={q_shape[1]} is not a multiple of 8 (the smallest layout block)"
  return None


def kernel_reason(backend: Backend, q_shape, dtype) -> str | None:
  """Why `backend`'s kernel cannot take this call's tiles, dtype or head dim (None when it can)."""
  from kernels.block_sparse import pallas_tpu  # noqa: PLC0415  (Pallas imports only where kernels are wanted)
  try:
    pallas_tpu.check_supported(q_shape, dtype, block_size_for(q_shape[1]), None, backend)
  except ValueError as e:
    return str(e)
  return None


def softmax_attention_pallas(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, *,
                             key_mask: jax.Array | None, causal: bool, scale: float | None, dropout_rate: float,
                             dropout_rng: jax.Array | None, implementation: str) -> jax.Array:
  """Full or causal softmax through `kernels.block_sparse.block_sparse_attention(implementation=...)` ("pallas":
  the kernel of the lowering platform; "interpret": the TPU kernels in interpret mode). Shapes must satisfy
  `call_reason` (checked by the caller)."""
  from kernels.block_sparse import block_sparse_attention  # noqa: PLC0415
  length = q_BxLxHxD.shape[1]
  block_size = block_size_for(length)
  return block_sparse_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, _layout(length, block_size, causal),
                                block_size=block_size, causal=causal, scale=scale, implementation=implementation,
                                dropout_rate=dropout_rate, dropout_rng=dropout_rng, **{_mask_keyword(): key_mask})


__all__ = ["BLOCK_SIZES", "block_size_for", "call_reason", "kernel_reason", "softmax_attention_pallas"]
