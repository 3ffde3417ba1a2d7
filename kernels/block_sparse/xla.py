"""The memory-efficient XLA form of block-sparse attention (plain jnp; autodiff gives the backward pass).

The layout is planned on the host (`tables.xla_plan`) into three parts computed apart and joined in one softmax:
  dense rows   query blocks whose row is (nearly) full, e.g. global tokens: ordinary attention over all keys,
               masked by their layout row: `[B, H, Nd, C, L]` scores;
  global slab  key blocks (nearly) every other row sees: one shared `[B, H, Ns, C, G·C]` score slab against the
               global keys, not copied per row;
  band         the remaining allowed key blocks of the other rows, listed in index tables padded to the widest
               *sparse* row only: `[B, H, Ns, C, K·C]` scores; the listed key/value blocks are gathered one list
               slot at a time in a scan (rematerialized in the backward pass), so no `[.., K, C, D]` copy is stored.
The slab and the band of a row share one softmax (merged through their per-query max and sum), so the values are
those of the dense reference; memory and work are O(L·K·C + G·C·L) instead of growing with the widest row times L.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse.common import NEG, dropout_keep
from kernels.block_sparse.reference import apply_dropout
from kernels.block_sparse.tables import xla_plan


def _expand(stat_BxHxRxC: jax.Array, reduced: tuple[int, ...], ndim: int) -> jax.Array:
  """A per-query statistic broadcast back over the axes `reduced` of a piece of scores with `ndim` dims."""
  axes = sorted(a % ndim for a in reduced)
  for a in axes:
    stat_BxHxRxC = jnp.expand_dims(stat_BxHxRxC, a)
  return stat_BxHxRxC


def _masked_softmax(scores: jax.Array, allowed: jax.Array) -> jax.Array:
  weights = jax.nn.softmax(jnp.where(allowed, scores, NEG), axis=-1)
  return jnp.where(allowed, weights, 0.0)


def block_sparse_attention_xla(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                               layout_HxNxN: np.ndarray, *, block_size: int, causal: bool = False,
                               scale: float | None = None, kv_mask: jax.Array | None = None,
                               dropout_rate: float = 0.0, dropout_seed: jax.Array | None = None) -> jax.Array:
  """Dense rows + global slab + gathered band (see the module docstring); same dropout mask as the reference."""
  b, length, h, d = q_BxLxHxD.shape
  dv = v_BxLxHxD.shape[-1]
  c, n = block_size, length // block_size
  scale = d ** -0.5 if scale is None else scale
  plan = xla_plan(layout_HxNxN, causal)
  out_dtype = q_BxLxHxD.dtype
  pos_NxC = jnp.arange(length).reshape(n, c)
  mask_BxNxC = None if kv_mask is None else kv_mask.astype(bool).reshape(b, n, c)

  def blocks(x_BxLxHxD):  # -> [B, H, N, C, D]
    return jnp.transpose(x_BxLxHxD.reshape(b, n, c, h, x_BxLxHxD.shape[-1]), (0, 3, 1, 2, 4))

  q_blocks, k_blocks, v_blocks = blocks(q_BxLxHxD), blocks(k_BxLxHxD), blocks(v_BxLxHxD)
  parts, part_rows = [], []

  # Dense rows: their query blocks against every key.
  if plan.dense_rows.size:
    rows = plan.dense_rows
    q_R = q_blocks[:, :, rows]  # [B, H, Nd, C, D]
    k_all, v_all = k_blocks.reshape(b, h, length, d), v_blocks.reshape(b, h, length, dv)
    scores = jnp.einsum("bhrqd,bhsd->bhrqs", q_R, k_all, preferred_element_type=jnp.float32) * scale
    allowed = jnp.repeat(jnp.asarray(plan.dense_allowed), c, axis=-1)[None, :, :, None, :]  # [1, H, Nd, 1, L]
    q_pos = pos_NxC[rows][None, None, :, :, None]
    if causal:
      allowed = allowed & (jnp.arange(length) <= q_pos)
    if kv_mask is not None:
      allowed = allowed & kv_mask.astype(bool)[:, None, None, None, :]
    weights = _masked_softmax(scores, allowed)
    weights = apply_dropout(weights, dropout_seed, dropout_rate, q_pos, jnp.arange(length))
    parts.append(jnp.einsum("bhrqs,bhsd->bhrqd", weights.astype(v_all.dtype), v_all,
                            preferred_element_type=jnp.float32))
    part_rows.append(rows)

  # Sparse rows: the global slab and the band share one softmax, merged through their per-query max and sum (no
  # concatenated copy of the scores). The band stays slot-major, `[K, B, H, Ns, C, C]`, as the scan produces it.
  if plan.sparse_rows.size:
    rows = plan.sparse_rows
    q_R = q_blocks[:, :, rows]  # [B, H, Ns, C, D]
    pieces = []  # (scores, allowed, key positions, query positions, batch*head counter, reduce axes, values fn)
    bh = jnp.arange(b)[:, None] * h + jnp.arange(h)[None, :]  # [B, H]
    g = plan.global_cols
    if g.size:
      k_g = k_blocks[:, :, g].reshape(b, h, g.size * c, d)
      v_g = v_blocks[:, :, g].reshape(b, h, g.size * c, dv)
      slab_scores = jnp.einsum("bhrqd,bhsd->bhrqs", q_R, k_g, preferred_element_type=jnp.float32) * scale
      slab = jnp.repeat(jnp.asarray(plan.slab_allowed), c, axis=-1)[None, :, :, None, :]  # [1, H, Ns, 1, G*C]
      if kv_mask is not None:
        slab = slab & mask_BxNxC[:, g].reshape(b, 1, 1, 1, g.size * c)
      pieces.append((slab_scores, slab, pos_NxC[g].reshape(1, 1, 1, 1, -1), pos_NxC[rows][None, None, :, :, None],
                     bh[:, :, None, None, None], (-1,),
                     lambda w: jnp.einsum("bhrqs,bhsd->bhrqd", w.astype(v_g.dtype), v_g,
                                          preferred_element_type=jnp.float32)))
    if plan.band_width:
      idx_KxHxR = jnp.asarray(np.moveaxis(plan.band_idx, -1, 0))  # [K, H or 1, Ns]
      heads_Hx1 = np.arange(h)[:, None]  # broadcasts a shared [1, Ns] table over the heads

      # One listed block per scan step, rematerialized in the backward pass: the gathered keys/values are never
      # stored for all K at once (they would be `2 * D / C` times the band's scores).
      @jax.checkpoint
      def score_step(_, idx_HxR):
        k_j = k_blocks[:, heads_Hx1, idx_HxR]  # [B, H, Ns, C, D]
        return None, jnp.einsum("bhrqd,bhrcd->bhrqc", q_R, k_j, preferred_element_type=jnp.float32) * scale

      band_scores = jax.lax.scan(score_step, None, idx_KxHxR)[1]  # [K, B, H, Ns, C, C]
      band = jnp.asarray(np.moveaxis(plan.band_valid, -1, 0))[:, None, :, :, None, None]  # [K, 1, H, Ns, 1, 1]
      if kv_mask is not None:
        band = band & jnp.moveaxis(mask_BxNxC[:, idx_KxHxR], 0, 1)[:, :, :, :, None, :]  # [K, B, H, Ns, 1, C]
      # Token positions from iota (fused by XLA), not a host constant the size of the scores.
      k_pos = (idx_KxHxR[..., None] * c + jnp.arange(c))[:, None, :, :, None, :]  # [K, 1, H, Ns, 1, C]

      def band_values(w_KxBxHxRxCxC):
        @jax.checkpoint
        def value_step(acc, xs):
          w_j, idx_HxR = xs
          v_j = v_blocks[:, heads_Hx1, idx_HxR]  # [B, H, Ns, C, D]
          return acc + jnp.einsum("bhrqc,bhrcd->bhrqd", w_j.astype(v_j.dtype), v_j,
                                  preferred_element_type=jnp.float32), None

        acc = jnp.zeros((b, h, rows.size, c, dv), jnp.float32)
        return jax.lax.scan(value_step, acc, (w_KxBxHxRxCxC, idx_KxHxR))[0]

      pieces.append((band_scores, band, k_pos, pos_NxC[rows][None, None, None, :, :, None],
                     bh[None, :, :, None, None, None], (0, -1), band_values))
    out = jnp.zeros((b, h, rows.size, c, dv), jnp.float32)
    if pieces:
      allowed = [a & (kp <= qp) if causal else a for _, a, kp, qp, _, _, _ in pieces]
      # Per query `[B, H, Ns, C]`: the max over every piece, then the sum of exponentials.
      m = functools.reduce(jnp.maximum, [jnp.max(jnp.where(a, sc, NEG), axis=ax) for (sc, _, _, _, _, ax, _), a
                                         in zip(pieces, allowed)])
      m = jax.lax.stop_gradient(m)  # any finite shift gives the same softmax
      exps, total = [], 0.0
      for (sc, _, _, _, _, ax, _), a in zip(pieces, allowed):
        # Masked scores go through the finite floor first: exp never overflows, so no NaN reaches the gradients.
        e = jnp.where(a, jnp.exp(jnp.where(a, sc, NEG) - _expand(m, ax, sc.ndim)), 0.0)
        exps.append(e)
        total = total + jnp.sum(e, axis=ax)
      inv = jnp.where(total > 0.0, 1.0 / jnp.where(total > 0.0, total, 1.0), 0.0)  # empty rows output 0
      for (sc, _, kp, qp, bhx, ax, fn), e in zip(pieces, exps):
        w = e * _expand(inv, ax, sc.ndim)
        if dropout_seed is not None and dropout_rate > 0.0:
          keep = dropout_keep(dropout_seed, bhx, qp, kp, dropout_rate)
          w = jnp.where(keep, w * (1.0 / (1.0 - dropout_rate)), 0.0)
        out = out + fn(w)
    parts.append(out)
    part_rows.append(rows)

  order = np.concatenate(part_rows)
  out_BxHxNxCxD = jnp.concatenate(parts, axis=2)
  if not np.array_equal(order, np.arange(n)):
    out_BxHxNxCxD = out_BxHxNxCxD[:, :, np.argsort(order)]
  out = jnp.transpose(out_BxHxNxCxD, (0, 2, 3, 1, 4)).reshape(b, length, h, dv)
  return out.astype(out_dtype)


__all__ = ["block_sparse_attention_xla"]
