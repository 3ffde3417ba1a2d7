"""Pallas TPU (Mosaic TPU) kernels of flex attention, FlashAttention-2 style over a block mask's tile lists.

Grid `(batch, program heads, own tile, list step)`; the block mask's tables (`tables.BlockMask`, flattened, traced or
constant) are scalar-prefetched into SMEM and drive the BlockSpec index maps, so only listed tiles are DMA'd. Each
query tile's list is its full key tiles then its partial ones (`Kf + Kp` steps); entries past a row's count repeat its
last tile (no new copy) and skip their compute. Full tiles run without mask work (key padding only); partial tiles
evaluate a pure index `mask_mod(b, h, q_idx, kv_idx)` on the tile's index arrays inside the kernel, or, for a mask
closing over arrays, load the tile's bfloat16 bitmap (`tables.partial_bitmaps`: one more BlockSpec, indexed by the
list position in the forward and dQ, by the scalar-prefetched `q_partial_pos` in dK/dV). `score_mod` runs on every
visited tile, forward and backward (its derivative by `jax.vjp` on the tile). The `gp` query heads of a GQA group
that share a table row are one program: their `[gp, bq, D]` queries are one `[gp * bq, D]` operand against the
group's key/value tile, loaded once. Forward: online softmax, log-sum-exp saved per row. dQ walks the same lists;
dK/dV walk, per key tile, the query tiles that see it (the transposed lists), summing the group's heads inside the
matmul. Dropout: the counter hash of `common.dropout_keep` on the normalized weights, regenerated in the backward.
A row with no allowed key outputs 0 and gets zero gradients. Scores, statistics and accumulators are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import MASK_VALUE, dropout_keep
from kernels.flex.tables import TPU_LANES as _LANES
from kernels.flex.tables import FlexStatic, table_widths

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _lanes(x_Rx128, width: int):
  if width <= _LANES:
    return x_Rx128[:, :width]
  return jnp.tile(x_Rx128, (1, width // _LANES))


def _rows2d(x):  # [gp, n, w] -> [gp * n, w]
  return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


class _Tile:
  """Index arrays of one [gp * bq, bkv] score tile and the mask / score / dropout math on it."""

  def __init__(self, st: FlexStatic, b, c, q_tile, kv_tile):
    self.st = st
    shape = (st.group_per_program * st.q_block, st.kv_block)
    rows = lax.broadcasted_iota(jnp.int32, shape, 0)
    if st.group_per_program == 1:
      head, row = jnp.full(shape, c, jnp.int32), rows
    elif st.q_block & (st.q_block - 1) == 0:
      shift = st.q_block.bit_length() - 1
      head = c * st.group_per_program + lax.shift_right_logical(rows, jnp.full(shape, shift, jnp.int32))
      row = rows & (st.q_block - 1)
    else:
      head, row = c * st.group_per_program + lax.div(rows, st.q_block), lax.rem(rows, st.q_block)
    self.b = b
    self.h = head
    self.q_idx = q_tile * st.q_block + row
    self.kv_idx = kv_tile * st.kv_block + lax.broadcasted_iota(jnp.int32, shape, 1)

  def scores(self, q2d, k):
    return lax.dot_general(q2d, k, _NT, preferred_element_type=jnp.float32) * self.st.scale

  def modded(self, s):
    if self.st.score_mod is None:
      return s
    return jnp.asarray(self.st.score_mod(s, self.b, self.h, self.q_idx, self.kv_idx), jnp.float32)

  def allowed(self, partial: bool, kvm_ref, bits_ref=None):
    allowed = None
    if partial and bits_ref is not None:
      bias = bits_ref[...].astype(jnp.float32)  # [bq, bkv]: 0 allowed, -inf masked; a program's gp heads share it
      if self.st.group_per_program > 1:
        bias = jnp.concatenate([bias] * self.st.group_per_program, axis=0)
      allowed = bias == 0.0
    elif partial and self.st.mask_mod is not None:
      allowed = jnp.asarray(self.st.mask_mod(self.b, self.h, self.q_idx, self.kv_idx), bool)
    if kvm_ref is not None:
      real = jnp.broadcast_to(kvm_ref[...] != 0, self.q_idx.shape)  # [1, bkv] over the rows
      allowed = real if allowed is None else allowed & real
    return allowed

  def drop_scale(self, seed_ref):
    st = self.st
    if st.rate <= 0.0:
      return None
    keep = dropout_keep(seed_ref[0], self.b * st.heads + self.h, self.q_idx, self.kv_idx, st.rate)
    return jnp.where(keep, 1.0 / (1.0 - st.rate), 0.0)


def _div(x, n: int):
  """x // n for non-negative int32 scalars (jnp's floor division lowers through `sign`, which Mosaic lowers only on
  a TPU host)."""
  return x if n == 1 else lax.div(x, jnp.int32(n))


def _row(st: FlexStatic, bi, c, t, tiles: int):
  """Flat table row of (batch bi, program head c, own tile t)."""
  bt = bi if st.table_batch > 1 else 0
  rt = _div(c * (st.group_per_program * st.table_heads), st.heads)
  return (bt * st.table_heads + rt) * tiles + t


def _listed(st, row, s, kf, nf_ref, fidx_ref, pidx_ref, kp):
  """The tile listed at step s of a row: full entries first, then partial ones."""
  del nf_ref
  full = fidx_ref[row * kf + jnp.minimum(s, kf - 1)]
  part = pidx_ref[row * kp + jnp.clip(s - kf, 0, kp - 1)]
  return jnp.where(s < kf, full, part)


def _optional_refs(st: FlexStatic, rest):
  """(key-validity ref or None, bitmap ref or None, the remaining refs) of a kernel's trailing inputs."""
  kvm_ref, rest = (rest[0], rest[1:]) if st.has_key_tiles else (None, rest)
  bits_ref, rest = (rest[0], rest[1:]) if st.has_bitmaps else (None, rest)
  return kvm_ref, bits_ref, rest


def _fwd_kernel(nf_ref, fidx_ref, np_ref, pidx_ref, seed_ref, q_ref, k_ref, v_ref, *rest, st: FlexStatic, kf: int,
                kp: int):
  kvm_ref, bits_ref, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _optional_refs(st, rest)
  bi, c, i, s = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = _row(st, bi, c, i, st.q_tiles)
  kv_tile = _listed(st, row, s, kf, nf_ref, fidx_ref, pidx_ref, kp)
  tile = _Tile(st, bi, c, i, kv_tile)

  @pl.when(s == 0)
  def _init():
    m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
    l_scr[...] = jnp.zeros_like(l_scr)
    acc_scr[...] = jnp.zeros_like(acc_scr)

  def compute(partial: bool):
    sc = tile.modded(tile.scores(_rows2d(q_ref[...]), k_ref[...]))
    allowed = tile.allowed(partial, kvm_ref, bits_ref)
    if allowed is not None:
      sc = jnp.where(allowed, sc, -jnp.inf)
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
    p = jnp.exp(sc - _lanes(m_next, st.kv_block))
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    drop = tile.drop_scale(seed_ref)
    p_used = p if drop is None else p * drop
    pv = jnp.dot(p_used.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * _lanes(alpha, acc_scr.shape[-1]) + pv

  pl.when(s < nf_ref[row])(lambda: compute(False))
  pl.when((s >= kf) & (s - kf < np_ref[row]))(lambda: compute(True))

  @pl.when(s == kf + kp - 1)
  def _finish():
    l = l_scr[...]
    seen = l > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    out = acc_scr[...] * _lanes(inv, acc_scr.shape[-1])
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)
    # A row without keys: MASK_VALUE (the merge convention of `return_lse`); the backward's p = exp(s - lse) there is
    # masked out (every score of such a row is masked), so no gradient comes of it.
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), MASK_VALUE).reshape(lse_ref.shape)


def _grads(tile: _Tile, partial, kvm_ref, bits_ref, seed_ref, q2d, k, v, do2d, lse2d, delta2d):
  """(p used for dV, dS wrt the raw scaled score) of one tile."""
  st = tile.st
  raw = tile.scores(q2d, k)
  if st.score_mod is None:
    sc, pull = raw, None
  else:
    sc, pull = jax.vjp(tile.modded, raw)
  allowed = tile.allowed(partial, kvm_ref, bits_ref)
  p = jnp.exp(sc - _lanes(lse2d, st.kv_block))
  if allowed is not None:
    p = jnp.where(allowed, p, 0.0)
  dp = lax.dot_general(do2d, v, _NT, preferred_element_type=jnp.float32)
  drop = tile.drop_scale(seed_ref)
  if drop is not None:
    dp = dp * drop
  ds = p * (dp - _lanes(delta2d, st.kv_block))
  if pull is not None:
    ds = pull(ds)[0]
  return (p if drop is None else p * drop), ds


def _dq_kernel(nf_ref, fidx_ref, np_ref, pidx_ref, seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
               st: FlexStatic, kf: int, kp: int):
  kvm_ref, bits_ref, (dq_ref, dq_scr) = _optional_refs(st, rest)
  bi, c, i, s = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = _row(st, bi, c, i, st.q_tiles)
  kv_tile = _listed(st, row, s, kf, nf_ref, fidx_ref, pidx_ref, kp)
  tile = _Tile(st, bi, c, i, kv_tile)

  @pl.when(s == 0)
  def _init():
    dq_scr[...] = jnp.zeros_like(dq_scr)

  def compute(partial: bool):
    k = k_ref[...]
    _, ds = _grads(tile, partial, kvm_ref, bits_ref, seed_ref, _rows2d(q_ref[...]), k, v_ref[...], _rows2d(do_ref[...]),
                   _rows2d(lse_ref[...]), _rows2d(delta_ref[...]))
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  pl.when(s < nf_ref[row])(lambda: compute(False))
  pl.when((s >= kf) & (s - kf < np_ref[row]))(lambda: compute(True))

  @pl.when(s == kf + kp - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * st.scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(nf_ref, fidx_ref, np_ref, pidx_ref, seed_ref, *rest, st: FlexStatic, qf: int, qp: int):
  if st.has_bitmaps:  # the scalar-prefetched q_partial_pos: read by the bitmap's index map only
    rest = rest[1:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = rest
  kvm_ref, bits_ref, (dk_ref, dv_ref, dk_scr, dv_scr) = _optional_refs(st, rest)
  bi, c, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  col = _row(st, bi, c, j, st.kv_tiles)
  q_tile = _listed(st, col, s, qf, nf_ref, fidx_ref, pidx_ref, qp)
  tile = _Tile(st, bi, c, q_tile, j)

  @pl.when(s == 0)
  def _init():
    dk_scr[...] = jnp.zeros_like(dk_scr)
    dv_scr[...] = jnp.zeros_like(dv_scr)

  def compute(partial: bool):
    q2d, do2d = _rows2d(q_ref[...]), _rows2d(do_ref[...])
    p_used, ds = _grads(tile, partial, kvm_ref, bits_ref, seed_ref, q2d, k_ref[...], v_ref[...], do2d, _rows2d(lse_ref[...]),
                        _rows2d(delta_ref[...]))
    dv_scr[...] += lax.dot_general(p_used.astype(do2d.dtype), do2d, _TN, preferred_element_type=jnp.float32)
    dk_scr[...] += lax.dot_general(ds.astype(q2d.dtype), q2d, _TN, preferred_element_type=jnp.float32)

  pl.when(s < nf_ref[col])(lambda: compute(False))
  pl.when((s >= qf) & (s - qf < np_ref[col]))(lambda: compute(True))

  @pl.when(s == qf + qp - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _maps(st: FlexStatic, tiles: int, width_full: int, width_part: int):
  """Index maps: `own` (the grid row's tile), `listed` (the step's listed tile), `kv_head` variants for K/V."""
  g = st.heads // st.kv_heads

  def listed_tile(bi, c, t, s, nf, fidx, npart, pidx, *_):
    row = _row(st, bi, c, t, tiles)
    return _listed(st, row, s, width_full, nf, fidx, pidx, width_part)

  def kv_head(c):
    return _div(c * st.group_per_program, g)

  return listed_tile, kv_head


def _bits_spec(st: FlexStatic, tiles: int, width_full: int, width_part: int, by_position: bool = False):
  """The BlockSpec of the partial-tile bitmaps `[N, bq, bkv]`: the bitmap of the step's partial list entry (a full
  list step keeps the row's first one resident). Forward/dQ: entry `row * Kp + p` itself; dK/dV: the flat index
  `q_partial_pos` stores for that entry of the transposed lists (the prefetch ref after the seed)."""

  def index(bi, c, t, s, *refs):
    row = _row(st, bi, c, t, tiles)
    entry = row * width_part + jnp.clip(s - width_full, 0, width_part - 1)
    return (refs[5][entry] if by_position else entry), 0, 0

  return pl.BlockSpec((None, st.q_block, st.kv_block), index)


def _lanes_blocks(x):  # [B, P, gp, L] -> [B, P, gp, L, 128]
  return jnp.broadcast_to(x[..., None], (*x.shape, _LANES))


def forward(st: FlexStatic, q, k, v, kvm, seed, tables, bits=None):
  """q [B, P, gp, Lq, D], k, v [B, Hkv, Lk, D] -> (o [B, P, gp, Lq, D], lse [B, P, gp, Lq] float32)."""
  b, progs, gp, lq, d = q.shape
  dv = v.shape[-1]
  bq, bkv = st.q_block, st.kv_block
  kf, kp, _, _ = table_widths(st, tables)
  listed_tile, kv_head = _maps(st, st.q_tiles, kf, kp)
  own_q = lambda bi, c, i, s, *_: (bi, c, 0, i, 0)  # noqa: E731
  kv_map = lambda bi, c, i, s, *t: (bi, kv_head(c), listed_tile(bi, c, i, s, *t), 0)  # noqa: E731
  in_specs = [pl.BlockSpec((None, None, gp, bq, d), own_q), pl.BlockSpec((None, None, bkv, d), kv_map),
              pl.BlockSpec((None, None, bkv, dv), kv_map)]
  args = [q, k, v]
  if kvm is not None:
    in_specs.append(pl.BlockSpec((None, 1, bkv), lambda bi, c, i, s, *t: (
        bi * st.kv_tiles + listed_tile(bi, c, i, s, *t), 0, 0)))
    args.append(kvm)
  if bits is not None:
    in_specs.append(_bits_spec(st, st.q_tiles, kf, kp))
    args.append(bits)
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, kf=kf, kp=kp),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5, grid=(b, progs, st.q_tiles, kf + kp), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, gp, bq, dv), own_q), pl.BlockSpec((None, None, gp, bq, _LANES), own_q)],
          scratch_shapes=[pltpu.VMEM((gp * bq, _LANES), jnp.float32), pltpu.VMEM((gp * bq, _LANES), jnp.float32),
                          pltpu.VMEM((gp * bq, dv), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, progs, gp, lq, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, progs, gp, lq, _LANES), jnp.float32)],
      compiler_params=_params(), interpret=st.interpret, name="flex_fwd",
  )(*tables[:4], seed, *args)
  return o, lse[..., 0]


def backward(st: FlexStatic, q, k, v, kvm, seed, tables, bits, do, lse, delta):
  """-> (dq, dk, dv) from the forward's log-sum-exp and `delta = rowsum(o * do)`."""
  b, progs, gp, lq, d = q.shape
  dv_dim = v.shape[-1]
  lk = k.shape[2]
  bq, bkv = st.q_block, st.kv_block
  kf, kp, qf, qp = table_widths(st, tables)
  lse_l, delta_l = _lanes_blocks(lse), _lanes_blocks(delta)

  # dQ: per query tile over the forward's lists.
  listed_tile, kv_head = _maps(st, st.q_tiles, kf, kp)
  own_q = lambda bi, c, i, s, *_: (bi, c, 0, i, 0)  # noqa: E731
  kv_map = lambda bi, c, i, s, *t: (bi, kv_head(c), listed_tile(bi, c, i, s, *t), 0)  # noqa: E731
  in_specs = [pl.BlockSpec((None, None, gp, bq, d), own_q), pl.BlockSpec((None, None, bkv, d), kv_map),
              pl.BlockSpec((None, None, bkv, dv_dim), kv_map), pl.BlockSpec((None, None, gp, bq, dv_dim), own_q),
              pl.BlockSpec((None, None, gp, bq, _LANES), own_q), pl.BlockSpec((None, None, gp, bq, _LANES), own_q)]
  args = [q, k, v, do, lse_l, delta_l]
  if kvm is not None:
    in_specs.append(pl.BlockSpec((None, 1, bkv), lambda bi, c, i, s, *t: (
        bi * st.kv_tiles + listed_tile(bi, c, i, s, *t), 0, 0)))
    args.append(kvm)
  if bits is not None:
    in_specs.append(_bits_spec(st, st.q_tiles, kf, kp))
    args.append(bits)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, kf=kf, kp=kp),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5, grid=(b, progs, st.q_tiles, kf + kp), in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, gp, bq, d), own_q),
          scratch_shapes=[pltpu.VMEM((gp * bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(), interpret=st.interpret, name="flex_bwd_dq",
  )(*tables[:4], seed, *args)

  # dK, dV: per key tile over the transposed lists; the program's gp heads are summed inside the matmuls.
  listed_q, kv_head = _maps(st, st.kv_tiles, qf, qp)
  q_map = lambda bi, c, j, s, *t: (bi, c, 0, listed_q(bi, c, j, s, *t), 0)  # noqa: E731
  own_kv = lambda bi, c, j, s, *_: (bi, kv_head(c), j, 0)  # noqa: E731
  out_kv = lambda bi, c, j, s, *_: (bi, c, j, 0)  # noqa: E731
  in_specs = [pl.BlockSpec((None, None, gp, bq, d), q_map), pl.BlockSpec((None, None, bkv, d), own_kv),
              pl.BlockSpec((None, None, bkv, dv_dim), own_kv), pl.BlockSpec((None, None, gp, bq, dv_dim), q_map),
              pl.BlockSpec((None, None, gp, bq, _LANES), q_map), pl.BlockSpec((None, None, gp, bq, _LANES), q_map)]
  args = [q, k, v, do, lse_l, delta_l]
  if kvm is not None:
    in_specs.append(pl.BlockSpec((None, 1, bkv), lambda bi, c, j, s, *_: (bi * st.kv_tiles + j, 0, 0)))
    args.append(kvm)
  prefetch = (*tables[4:8], seed)
  if bits is not None:
    in_specs.append(_bits_spec(st, st.kv_tiles, qf, qp, by_position=True))
    args.append(bits)
    prefetch = prefetch + (tables[8],)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, qf=qf, qp=qp),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch), grid=(b, progs, st.kv_tiles, qf + qp), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bkv, d), out_kv), pl.BlockSpec((None, None, bkv, dv_dim), out_kv)],
          scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32), pltpu.VMEM((bkv, dv_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, progs, lk, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, progs, lk, dv_dim), jnp.float32)],
      compiler_params=_params(), interpret=st.interpret, name="flex_bwd_dkv",
  )(*prefetch, *args)
  if progs != st.kv_heads:  # one program per query head (tables per query head): sum each group's heads
    dk = dk.reshape(b, st.kv_heads, progs // st.kv_heads, lk, d).sum(2)
    dv = dv.reshape(b, st.kv_heads, progs // st.kv_heads, lk, dv_dim).sum(2)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


__all__ = ["backward", "forward"]
