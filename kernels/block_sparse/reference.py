"""The dense reference of block-sparse attention: `[B, H, L, L]` scores with the layout expanded to a token mask.
O(L^2) memory; the ground truth in tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse.tables import expand_layout
from kernels.common import MASK_VALUE, dropout_keep


def apply_dropout(weights_BxHxQxK: jax.Array, seed, rate: float, q_pos, k_pos) -> jax.Array:
  """Hash-mask dropout on `[B, H, Q, K]` weights whose rows / columns are the token positions `q_pos [Q]` (or
  broadcastable) and `k_pos`; `seed` None or `rate == 0` leaves them unchanged."""
  if seed is None or rate <= 0.0:
    return weights_BxHxQxK
  b, h = weights_BxHxQxK.shape[:2]
  bh = (jnp.arange(b)[:, None] * h + jnp.arange(h)[None, :]).reshape(b, h, *([1] * (weights_BxHxQxK.ndim - 2)))
  keep = dropout_keep(seed, bh, q_pos, k_pos, rate)
  return jnp.where(keep, weights_BxHxQxK * (1.0 / (1.0 - rate)), 0.0)


def block_sparse_attention_reference(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                                     layout_HxNxN: np.ndarray, *, block_size: int, causal: bool = False,
                                     scale: float | None = None, key_mask: jax.Array | None = None,
                                     dropout_rate: float = 0.0, dropout_seed: jax.Array | None = None) -> jax.Array:
  """Dense scores, the layout expanded to a token mask; dropout (the hash mask of `kernels.common.dropout_keep`) on the
  normalized weights when `dropout_seed` (int32, `kernels.common.dropout_seed`) is given."""
  length = q_BxLxHxD.shape[1]
  scale = q_BxLxHxD.shape[-1] ** -0.5 if scale is None else scale
  scores_BxHxLxL = jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k_BxLxHxD, preferred_element_type=jnp.float32) * scale
  allowed_BxHxLxL = jnp.asarray(expand_layout(layout_HxNxN, block_size))[None]
  if causal:
    allowed_BxHxLxL = allowed_BxHxLxL & jnp.tril(jnp.ones((length, length), bool))
  if key_mask is not None:
    allowed_BxHxLxL = allowed_BxHxLxL & key_mask.astype(bool)[:, None, None, :]
  # A finite floor (not -inf) keeps empty rows finite; zeroing their weights afterwards makes them output 0.
  weights = jax.nn.softmax(jnp.where(allowed_BxHxLxL, scores_BxHxLxL, MASK_VALUE), axis=-1)
  weights = jnp.where(allowed_BxHxLxL, weights, 0.0)
  pos = jnp.arange(length)
  weights = apply_dropout(weights, dropout_seed, dropout_rate, pos[:, None], pos[None, :])
  out = jnp.einsum("bhls,bshd->blhd", weights.astype(v_BxLxHxD.dtype), v_BxLxHxD, preferred_element_type=jnp.float32)
  return out.astype(q_BxLxHxD.dtype)


__all__ = ["apply_dropout", "block_sparse_attention_reference"]
