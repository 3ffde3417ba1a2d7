"""Softmax attention through the project's Pallas flash kernels: the block-sparse kernels with a full (or causal)
layout are flash kernels (online softmax over key tiles, the hash dropout of `kernels.common` regenerated in their
backward), so softmax runs them on GPU (Mosaic GPU, Hopper) and TPU rather than keeping kernels of its own.

They serve self-attention (queries and keys of one length) without an ALiBi bias, in the dtypes and head dims
`kernels.block_sparse` takes; `call_reason` / `kernel_reason` say why a call is outside that, and
`kernels.softmax.softmax_attention` then falls back to the XLA flash form (logged once with that reason). A length
that is not a multiple of the tile (LRA's CLS token makes 4K + 1) is padded to one: padded keys are masked, padded
query rows cut off, and the dropout counters of real tokens (their positions) are unchanged.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from kernels.platform import Backend

# Layout blocks tried, largest first: a full layout of few blocks keeps the kernels' index tables small; the kernel
# tiles (64 on GPU, up to 128 on TPU) are chosen inside the layout blocks by `kernels.block_sparse`.
BLOCK_SIZES = (512, 256, 128, 64, 32, 16, 8)


def padded_length(length: int) -> int:
  """The length the kernels run at: a multiple of 64 (the GPU tile), or of 8 for shorter sequences."""
  unit = 64 if length >= 64 else 8
  return -(-length // unit) * unit


def block_size_for(length: int) -> int:
  """The layout block of a `length`-token call (after padding: always found)."""
  return next(b for b in BLOCK_SIZES if padded_length(length) % b == 0)


def _layout(length: int, block_size: int, causal: bool) -> np.ndarray:
  n = length // block_size
  full = np.ones((1, n, n), bool)
  return np.tril(full) if causal else full



def call_reason(q_shape, k_shape, alibi_slopes) -> str | None:
  """Why no kernel can serve the call whatever the backend (None when the shapes fit)."""
  if tuple(q_shape[:2]) != tuple(k_shape[:2]) or q_shape[2] != k_shape[2]:
    return (f"queries {tuple(q_shape)} and keys {tuple(k_shape)} differ in batch, length or heads (decoding, "
            f"cross-attention): the kernels take self-attention")
  if alibi_slopes is not None:
    return "alibi_slopes: the kernels add no positional bias"
  return None


def kernel_reason(backend: Backend, q_shape, dtype) -> str | None:
  """Why `backend`'s kernel cannot take this call's tiles, dtype or head dim (None when it can)."""
  from kernels.block_sparse.tables import check_supported  # noqa: PLC0415
  try:
    padded = (q_shape[0], padded_length(q_shape[1]), *q_shape[2:])
    check_supported(padded, dtype, block_size_for(q_shape[1]), None, backend)
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
  batch, length = q_BxLxHxD.shape[:2]
  padded, block_size = padded_length(length), block_size_for(length)
  if padded != length:
    key_mask = jnp.ones((batch, length), bool) if key_mask is None else key_mask
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, key_mask = map(pad, (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, key_mask))
  out = block_sparse_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, _layout(padded, block_size, causal),
                               block_size=block_size, causal=causal, scale=scale, implementation=implementation,
                               dropout_rate=dropout_rate, dropout_rng=dropout_rng, key_mask=key_mask)
  return out[:, :length]


__all__ = ["BLOCK_SIZES", "block_size_for", "padded_length", "call_reason", "kernel_reason", "softmax_attention_pallas"]
