"""Exact softmax (dot-product) attention in its plain einsum form: the ground truth the other cores are tested
against, and the core that layers with their own score patterns (Linformer's projected keys, windows, blocks) call.

Also the attention-dropout mask every core that materializes attention weights applies (`dropout_weights`), so the
same rule (inverted dropout, bernoulli keep mask from one key) holds everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(q_len: int, k_len: int) -> jax.Array:
  """`[q_len, k_len]` bool, True where key position <= query position (queries aligned to the last keys)."""
  offset = k_len - q_len
  return jnp.arange(q_len)[:, None] + offset >= jnp.arange(k_len)[None, :]


def dropout_weights(weights: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout on attention weights; the identity when `rng` is None (evaluation) or `rate` is 0."""
  if rate <= 0.0 or rng is None:
    return weights
  keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
  return jnp.where(keep, weights / (1.0 - rate), 0.0).astype(weights.dtype)


def softmax_attention_reference(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array, *,
                                mask: jax.Array | None = None, causal: bool = False, scale: float | None = None,
                                dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """The plain einsum form, scores and softmax in float32. `mask` broadcasts to `[B, H, L, S]` (True = may attend).

  Rows with no allowed key give a uniform average rather than NaN (only fully padded sequences have them). The output
  has the dtype of `q`.
  """
  scale = q_BxLxHxD.shape[-1] ** -0.5 if scale is None else scale
  scores_BxHxLxS = jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k_BxSxHxD,
                              preferred_element_type=jnp.float32) * scale
  allowed = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask
  if causal:
    allowed = allowed & causal_mask(q_BxLxHxD.shape[1], k_BxSxHxD.shape[1])
  # A large finite negative (not -inf) keeps fully masked rows and their gradients finite.
  scores_BxHxLxS = jnp.where(allowed, scores_BxHxLxS, jnp.finfo(jnp.float32).min)
  weights_BxHxLxS = dropout_weights(jax.nn.softmax(scores_BxHxLxS, axis=-1), dropout_rate, dropout_rng)
  out = jnp.einsum("bhls,bshd->blhd", weights_BxHxLxS.astype(v_BxSxHxD.dtype), v_BxSxHxD,
                   preferred_element_type=jnp.float32)
  return out.astype(q_BxLxHxD.dtype)
