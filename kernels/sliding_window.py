"""Sliding-window softmax attention: query t attends to keys s with `t - window < s <= t` (causal) or
`|t - s| < window` (non-causal), padded keys excluded.

"reference" builds the dense `[L, L]` mask (ground truth); "xla" works in chunks of `window` positions, each query
chunk scoring only its own and the neighbouring key chunks, so memory is `O(L * window)`. Softmax in float32; a
query with no allowed key (only possible at padded positions) gets 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("reference", "xla", None)


def _allowed(q_pos, k_pos, window: int, causal: bool):
  diff = q_pos[:, None] - k_pos[None, :]
  return (diff >= 0) & (diff < window) if causal else jnp.abs(diff) < window


def _masked_softmax(scores, allowed):
  scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.where(allowed, jnp.exp(scores - row_max), 0.0)
  weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
  return weights


def sliding_window_attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, *, window: int,
                             causal: bool, key_mask_BxL: jax.Array | None = None, scale: float | None = None,
                             implementation: str | None = None) -> jax.Array:
  """Softmax attention restricted to a window of `window` positions (see module docstring)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown sliding_window_attention implementation {implementation!r}; "
                     f"valid choices: {IMPLEMENTATIONS}")
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window=}")
  b, length, h, d = q_BxLxHxD.shape
  scale = d ** -0.5 if scale is None else scale
  f32 = jnp.float32
  q, k, v = (x.astype(f32) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
  key_mask = jnp.ones((b, length), bool) if key_mask_BxL is None else key_mask_BxL.astype(bool)

  if implementation == "reference" or length <= window:
    pos = jnp.arange(length)
    allowed = _allowed(pos, pos, window, causal)[None, None] & key_mask[:, None, None, :]
    scores = jnp.einsum("blhd,bshd->bhls", q, k) * scale
    weights = _masked_softmax(scores, allowed)
    return jnp.einsum("bhls,bshd->blhd", weights, v).astype(v_BxLxHxD.dtype)

  c = window
  pad = -length % c
  n = (length + pad) // c
  padded = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
  q, k, v, key_mask = padded(q), padded(k), padded(v), padded(key_mask)  # padded keys are masked out
  chunks = lambda x: x.reshape(b, n, c, *x.shape[2:])  # noqa: E731
  q_c, k_c, v_c, m_c = chunks(q), chunks(k), chunks(v), chunks(key_mask)

  # Key blocks per query chunk: previous, own (and next, if not causal); out-of-range neighbours are masked.
  offsets = (-1, 0) if causal else (-1, 0, 1)
  shift = lambda x, o: jnp.roll(x, -o, axis=1)  # noqa: E731  chunk i gets chunk i+o
  k_n = jnp.concatenate([shift(k_c, o) for o in offsets], axis=2)  # [B, N, len(offsets)*C, H, D]
  v_n = jnp.concatenate([shift(v_c, o) for o in offsets], axis=2)
  m_n = jnp.concatenate([shift(m_c, o) for o in offsets], axis=2)  # [B, N, K]
  chunk_idx = jnp.arange(n)
  k_pos = jnp.concatenate([(chunk_idx[:, None] + o) * c + jnp.arange(c)[None, :] for o in offsets], axis=1)
  q_pos = chunk_idx[:, None] * c + jnp.arange(c)[None, :]  # [N, C]
  in_range = (k_pos >= 0) & (k_pos < n * c)
  allowed_NxCxK = jax.vmap(lambda qp, kp: _allowed(qp, kp, window, causal))(q_pos, k_pos) & in_range[:, None, :]
  allowed = allowed_NxCxK[None, :, None] & m_n[:, :, None, None, :]  # [B, N, H?, C, K] via broadcasting
  scores = jnp.einsum("bnchd,bnkhd->bnhck", q_c, k_n) * scale
  weights = _masked_softmax(scores, allowed)
  out = jnp.einsum("bnhck,bnkhd->bnchd", weights, v_n)
  return out.reshape(b, n * c, h, d)[:, :length].astype(v_BxLxHxD.dtype)
