"""Exact softmax (dot-product) attention in its plain einsum form: the ground truth the other cores are tested
against, and the core that layers with their own score patterns (Linformer's projected keys, windows, blocks) call.

Attention dropout here uses the counter hash of `kernels.common` (`dropout_keep` on (seed, batch * heads + head,
query position, key position), the seed drawn from `dropout_rng` by `dropout_seed`), so the reference, the flash form
and the Pallas kernels drop the same weights for the same key. `dropout_weights` (a bernoulli mask from one key) stays
for the layers that materialize weights of other shapes (reformer, sinkhorn's bucket scores, `AttentionLayer`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.common import MASK_VALUE, dropout_keep, dropout_seed


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


def hash_dropout(weights_BxHxLxS: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout of `[B, H, L, S]` weights by the counter hash: query i at position `i + S - L`, key j at j."""
  if rate <= 0.0 or rng is None:
    return weights_BxHxLxS
  b, h, length, keys = weights_BxHxLxS.shape
  bh = (jnp.arange(b)[:, None] * h + jnp.arange(h)[None, :])[:, :, None, None]
  q_pos = (jnp.arange(length) + keys - length)[None, None, :, None]
  keep = dropout_keep(dropout_seed(rng), bh, q_pos, jnp.arange(keys)[None, None, None, :], rate)
  return jnp.where(keep, weights_BxHxLxS * (1.0 / (1.0 - rate)), 0.0)


def alibi_bias(slopes_H: jax.Array, q_len: int, k_len: int) -> jax.Array:
  """`[H, q_len, k_len]` ALiBi bias `-slope_h * |q_pos - k_pos|`, query i at position `i + k_len - q_len` (for the
  allowed keys of a causal call this is `-slope_h * (q_pos - k_pos)`)."""
  q_pos = jnp.arange(q_len) + k_len - q_len
  dist = jnp.abs(q_pos[:, None] - jnp.arange(k_len)[None, :]).astype(jnp.float32)
  return -jnp.asarray(slopes_H, jnp.float32)[:, None, None] * dist[None]


def softmax_attention_reference(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array, *,
                                mask: jax.Array | None = None, key_mask: jax.Array | None = None,
                                causal: bool = False, scale: float | None = None, dropout_rate: float = 0.0,
                                dropout_rng: jax.Array | None = None,
                                alibi_slopes: jax.Array | None = None) -> jax.Array:
  """The plain einsum form, scores and softmax in float32.

  `mask` broadcasts to `[B, H, L, S]` (True = may attend; the structured masks of other layers); `key_mask` is bool
  `[B, S]` (True = a real key), the convention of `softmax_attention`. A row with no allowed key outputs 0 (with
  finite gradients). `alibi_slopes [H]` adds the ALiBi bias (`alibi_bias`); dropout is the counter-hash mask
  (`hash_dropout`). The output has the dtype of `q`.
  """
  length, keys = q_BxLxHxD.shape[1], k_BxSxHxD.shape[1]
  scale = q_BxLxHxD.shape[-1] ** -0.5 if scale is None else scale
  scores_BxHxLxS = jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k_BxSxHxD,
                              preferred_element_type=jnp.float32) * scale
  if alibi_slopes is not None:
    scores_BxHxLxS = scores_BxHxLxS + alibi_bias(alibi_slopes, length, keys)[None]
  allowed = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask
  if key_mask is not None:
    allowed = allowed & jnp.asarray(key_mask).astype(bool)[:, None, None, :]
  if causal:
    allowed = allowed & causal_mask(length, keys)
  # A large finite negative (not -inf) keeps fully masked rows and their gradients finite; zeroing the weights of
  # masked keys afterwards makes such rows output 0, as the flash form and the kernels do.
  scores_BxHxLxS = jnp.where(allowed, scores_BxHxLxS, MASK_VALUE)
  weights_BxHxLxS = jnp.where(allowed, jax.nn.softmax(scores_BxHxLxS, axis=-1), 0.0)
  weights_BxHxLxS = hash_dropout(weights_BxHxLxS, dropout_rate, dropout_rng)
  out = jnp.einsum("bhls,bshd->blhd", weights_BxHxLxS.astype(v_BxSxHxD.dtype), v_BxSxHxD,
                   preferred_element_type=jnp.float32)
  return out.astype(q_BxLxHxD.dtype)
