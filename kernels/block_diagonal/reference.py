"""Softmax attention within non-overlapping blocks (block-diagonal attention), in its reference form."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.softmax.reference import softmax_attention_reference


def block_diagonal_attention_reference(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, *,
                                       block_size: int, causal: bool, key_mask: jax.Array | None = None,
                                       dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """Softmax attention within blocks of `block_size` positions; causal inside the block when `causal`.

  Lengths that are not a multiple of `block_size` are padded internally and the padding masked; a query without a
  single real key in its block (the op template's convention) outputs 0. The output has the shape and dtype of `q`.
  """
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size=}")
  b, length, h, d = q_BxLxHxD.shape
  pad = -length % block_size
  key_mask = jnp.ones((b, length), bool) if key_mask is None else key_mask.astype(bool)
  pad_seq = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
  n = (length + pad) // block_size
  to_blocks = lambda x: pad_seq(x).reshape(b * n, block_size, *x.shape[2:])  # noqa: E731
  keys_BNxS = to_blocks(key_mask)
  out = softmax_attention_reference(to_blocks(q_BxLxHxD), to_blocks(k_BxLxHxD), to_blocks(v_BxLxHxD),
                                    mask=keys_BNxS[:, None, None, :], causal=causal, dropout_rate=dropout_rate,
                                    dropout_rng=dropout_rng)
  # Queries that see no real key (causal: none at or before them in the block) get 0, not an average of padding.
  seen_BNxS = jnp.cumsum(keys_BNxS, axis=1) > 0 if causal else jnp.any(keys_BNxS, axis=1, keepdims=True)
  out = jnp.where(seen_BNxS[:, :, None, None], out, jnp.zeros((), out.dtype))
  return out.reshape(b, n * block_size, h, d)[:, :length]


__all__ = ["block_diagonal_attention_reference"]
