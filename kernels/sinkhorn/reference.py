"""Sinkhorn balancing in the log domain (Sparse Sinkhorn attention's soft block permutation), reference form."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.common import MASK_VALUE


def sinkhorn_normalize_reference(log_alpha: jax.Array, iters: int, *, mask: jax.Array | None = None,
                                 causal: bool = False) -> jax.Array:
  """Sinkhorn balancing over the last two axes `[..., rows, cols]`; returns `S = exp(...)` in float32.

  The rows are normalized, then each of the `iters` iterations normalizes the columns and then the rows, so `S` is
  exactly row-stochastic and approaches doubly stochastic as `iters` grows (`iters=0` is a row softmax: the LRA
  code's "softmax sort"). `mask` (broadcastable bool, True = entry may be non-zero) restricts the support; masked
  entries are exactly 0 and rows with no allowed entry are all-zero. `causal=True` normalizes each entry `(i, j)` by
  its column's sum over rows `<= i` only, so row `i` depends on rows `<= i` alone.
  """
  if iters < 0:
    raise ValueError(f"sinkhorn iters must be >= 0, got {iters}")
  allowed = jnp.ones((1,) * log_alpha.ndim, bool) if mask is None else mask

  def normalize(x: jax.Array, lse: jax.Array) -> jax.Array:
    # Finite "minus infinity" (in float32: the scores are cast first): masked entries get exactly zero weight and
    # fully masked rows stay finite.
    return jnp.where(allowed, x - lse, MASK_VALUE)

  def normalize_rows(x: jax.Array) -> jax.Array:
    return normalize(x, jax.nn.logsumexp(x, axis=-1, keepdims=True))

  def iteration(_, x: jax.Array) -> jax.Array:
    col = jax.lax.cumlogsumexp(x, axis=x.ndim - 2) if causal else jax.nn.logsumexp(x, axis=-2, keepdims=True)
    return normalize_rows(normalize(x, col))

  x = normalize_rows(normalize(log_alpha.astype(jnp.float32), 0.0))
  # A loop rather than unrolled Python: compile time then does not grow with `iters`.
  x = jax.lax.fori_loop(0, iters, iteration, x)
  return jnp.where(allowed, jnp.exp(x), 0.0)


__all__ = ["sinkhorn_normalize_reference"]
