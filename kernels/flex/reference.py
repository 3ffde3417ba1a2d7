"""The dense form of flex attention: every score of the `[B, H, Lq, Lk]` grid, the ground truth of the other forms.

allowed(b, h, i, j) = tile(i, j) visited by the block mask (if any) and (tile full, or `mask_mod(b, h, i, j)`)
                      and key_mask[b, j];
score(b, h, i, j)   = score_mod(scale * q_i·k_j, b, h, i, j)  (float32);
weights             = softmax over the allowed keys (a row with none outputs 0, with finite gradients), then dropout
                      by the counter hash of `kernels.common` (counters b * H + h, i, j), as every op.
Grouped-query attention: key/value head `h * Hkv // H` serves query head h.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.common import MASK_VALUE, dropout_keep
from kernels.flex.tables import FULL, PARTIAL, BlockMask


def grid_indices(batch: int, heads: int, q_len: int, kv_len: int):
  """`(b [B,1,1,1], h [1,H,1,1], q_idx [1,1,Lq,1], kv_idx [1,1,1,Lk])` int32: the arguments of a mask or score
  function on the whole grid."""
  ar = lambda n: jnp.arange(n, dtype=jnp.int32)  # noqa: E731
  return (ar(batch)[:, None, None, None], ar(heads)[None, :, None, None], ar(q_len)[None, None, :, None],
          ar(kv_len)[None, None, None, :])


def dense_allowed(mask_mod, block_mask: BlockMask | None, key_mask, batch: int, heads: int, q_len: int,
                  kv_len: int) -> jax.Array:
  """bool, broadcastable to `[B, H, Lq, Lk]`: which scores the softmax sees."""
  b, h, qi, ki = grid_indices(batch, heads, q_len, kv_len)
  element = jnp.ones((1, 1, 1, 1), bool) if mask_mod is None else jnp.asarray(mask_mod(b, h, qi, ki), bool)
  allowed = element
  if block_mask is not None:
    classes = block_mask.to_dense()  # [B', Hm, Tq, Tk]
    rows = (jnp.arange(heads) * classes.shape[1]) // heads
    classes = classes[:, rows]  # per query head
    tiles = classes[:, :, qi[0, 0, :, 0] // block_mask.q_block][:, :, :, ki[0, 0, 0, :] // block_mask.kv_block]
    allowed = (tiles == FULL) | ((tiles == PARTIAL) & element)
  if key_mask is not None:
    allowed = allowed & jnp.asarray(key_mask, bool)[:, None, None, :]
  return allowed


def flex_attention_reference(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *, mask_mod=None,
                             score_mod=None, block_mask: BlockMask | None = None, key_mask=None,
                             scale: float | None = None, dropout_rate: float = 0.0,
                             dropout_seed: jax.Array | None = None) -> jax.Array:
  """Flex attention by its definition (module docstring); `dropout_seed` an int32 scalar (`common.dropout_seed`)."""
  batch, q_len, heads, d = q_BxLxHxD.shape
  kv_len, kv_heads = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  if block_mask is not None and mask_mod is None:
    mask_mod = block_mask.mask_mod
  scale = d ** -0.5 if scale is None else scale
  group = heads // kv_heads
  k = jnp.repeat(k_BxSxKxD, group, axis=2)
  v = jnp.repeat(v_BxSxKxD, group, axis=2)
  s = jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k, preferred_element_type=jnp.float32) * scale
  if score_mod is not None:
    s = jnp.asarray(score_mod(s, *grid_indices(batch, heads, q_len, kv_len)), jnp.float32)
  allowed = dense_allowed(mask_mod, block_mask, key_mask, batch, heads, q_len, kv_len)
  s = jnp.where(allowed, s, MASK_VALUE)
  w = jnp.where(allowed, jax.nn.softmax(s, axis=-1), 0.0)
  if dropout_seed is not None and dropout_rate > 0.0:
    b, h, qi, ki = grid_indices(batch, heads, q_len, kv_len)
    keep = dropout_keep(dropout_seed, b * heads + h, qi, ki, dropout_rate)
    w = jnp.where(keep, w * (1.0 / (1.0 - dropout_rate)), 0.0)
  out = jnp.einsum("bhls,bshd->blhd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q_BxLxHxD.dtype)


__all__ = ["dense_allowed", "flex_attention_reference", "grid_indices"]
