"""Sliding-window softmax attention in chunks of `window` positions: each query chunk scores only its own and the
neighbouring key chunks, so memory is `O(L * window)`. Softmax in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.sliding_window.reference import allowed_pairs, masked_softmax


def sliding_window_attention_xla(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, *, window: int,
                                 causal: bool, key_mask: jax.Array | None = None,
                                 scale: float | None = None) -> jax.Array:
  """Chunked form of `sliding_window_attention_reference` (same values)."""
  b, length, h, d = q_BxLxHxD.shape
  scale = d ** -0.5 if scale is None else scale
  f32 = jnp.float32
  q, k, v = (x.astype(f32) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
  key_mask = jnp.ones((b, length), bool) if key_mask is None else key_mask.astype(bool)
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
  allowed_NxCxK = jax.vmap(lambda qp, kp: allowed_pairs(qp, kp, window, causal))(q_pos, k_pos) & in_range[:, None, :]
  allowed = allowed_NxCxK[None, :, None] & m_n[:, :, None, None, :]  # [B, N, H?, C, K] via broadcasting
  scores = jnp.einsum("bnchd,bnkhd->bnhck", q_c, k_n) * scale
  weights = masked_softmax(scores, allowed)
  out = jnp.einsum("bnhck,bnkhd->bnchd", weights, v_n)
  return out.reshape(b, n * c, h, d)[:, :length].astype(v_BxLxHxD.dtype)


__all__ = ["sliding_window_attention_xla"]
