"""Sliding-window softmax attention, dense form: the `[L, L]` mask of allowed (query, key) pairs (ground truth)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.common import MASK_VALUE


def allowed_pairs(q_pos, k_pos, window: int, causal: bool):
  diff = q_pos[:, None] - k_pos[None, :]
  return (diff >= 0) & (diff < window) if causal else jnp.abs(diff) < window


def masked_softmax(scores, allowed):
  """Softmax of float32 `scores` over the allowed entries of the last axis; a row with none gets zeros."""
  scores = jnp.where(allowed, scores, MASK_VALUE)  # finite: exp(MASK_VALUE - row_max) is 0 (or 1, zeroed below)
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  weights = jnp.where(allowed, jnp.exp(scores - row_max), 0.0)
  weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
  return weights


def sliding_window_attention_reference(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, *,
                                       window: int, causal: bool, key_mask: jax.Array | None = None,
                                       scale: float | None = None) -> jax.Array:
  """Softmax over the keys in the window (float32 inside); a query with no allowed key gets 0."""
  b, length, h, d = q_BxLxHxD.shape
  scale = d ** -0.5 if scale is None else scale
  f32 = jnp.float32
  q, k, v = (x.astype(f32) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
  key_mask = jnp.ones((b, length), bool) if key_mask is None else key_mask.astype(bool)
  pos = jnp.arange(length)
  allowed = allowed_pairs(pos, pos, window, causal)[None, None] & key_mask[:, None, None, :]
  scores = jnp.einsum("blhd,bshd->bhls", q, k) * scale
  weights = masked_softmax(scores, allowed)
  return jnp.einsum("bhls,bshd->blhd", weights, v).astype(v_BxLxHxD.dtype)


__all__ = ["allowed_pairs", "masked_softmax", "sliding_window_attention_reference"]
