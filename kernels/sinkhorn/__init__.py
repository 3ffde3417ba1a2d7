"""Sinkhorn balancing of block-sorting scores (Sparse Sinkhorn attention's soft block permutation): the public entry.

`sinkhorn_normalize(log_alpha [..., rows, cols], iters)` balances in the log domain (see `reference.py`); `mask`
(broadcastable bool, True = the entry may be non-zero) restricts the support, and `key_mask` (bool `[batch, cols]`,
True = a real key block) is the op template's key-padding mask: columns of padded key blocks get exactly zero
weight. Implementations (the op template of docs/architecture.md "Functional cores"): "reference"; None is
"reference" on every platform (no XLA or Pallas form yet: "xla", "pallas" and "interpret" are refused).
"""

from __future__ import annotations

import jax

from kernels.sinkhorn.reference import sinkhorn_normalize_reference

IMPLEMENTATIONS = ("reference", None)
OP = "sinkhorn_normalize"


def sinkhorn_normalize(log_alpha: jax.Array, iters: int, *, mask: jax.Array | None = None, causal: bool = False,
                       key_mask: jax.Array | None = None, implementation: str | None = None) -> jax.Array:
  """Sinkhorn balancing over the last two axes `[batch, ..., rows, cols]`; returns `S = exp(...)` in float32."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {OP} implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  if key_mask is not None:
    batch, cols = log_alpha.shape[0], log_alpha.shape[-1]
    if tuple(key_mask.shape) != (batch, cols):
      raise ValueError(f"key_mask must have shape [batch, cols] = {(batch, cols)}, got {tuple(key_mask.shape)}")
    real = key_mask.astype(bool).reshape(batch, *([1] * (log_alpha.ndim - 2)), cols)
    mask = real if mask is None else mask & real
  return sinkhorn_normalize_reference(log_alpha, iters, mask=mask, causal=causal)


__all__ = ["IMPLEMENTATIONS", "sinkhorn_normalize", "sinkhorn_normalize_reference"]
