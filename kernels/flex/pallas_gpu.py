"""Mosaic GPU (Hopper) kernels of flex attention; see `pallas_tpu` for the algorithm and `tables` for the tile lists.
One warpgroup per program (query tile or key tile, query head, batch row); the traced tables are read from global
memory (index loads: Mosaic GPU has no scalar prefetch) and the listed tiles double-buffered into shared memory by
TMA (`kernels.mosaic_gpu.stream`), the full tiles of a row first (no mask work), then its partial ones (a pure index
`mask_mod` on the tile's index arrays in the wgmma register layout; a mask closing over arrays as the tile's bfloat16
bitmap, `tables.partial_bitmaps`, TMA-copied beside the tile and added to the scores: the dK/dV kernel reads a
transposed copy XLA makes for the backward, at the entry `q_partial_pos` names). `score_mod` runs on the score registers, its vjp in the
backward. Matmuls are wgmma with float32 accumulators; K (forward, dQ), V (dQ), Q and dO (dK/dV) are also passed
transposed by XLA so every wgmma B operand is a plain shared-memory tile (`kernels.mosaic_gpu`). GQA: a query head's
program reads its group's key/value head; dK/dV are computed per query head and summed over the group by XLA
(the TPU kernels share one program per group instead). Dropout: the hash of `common.dropout_keep`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_gpu as mg
from kernels.common import MASK_VALUE, dropout_keep
from kernels.flex.tables import FlexStatic, table_widths

_M_INIT = MASK_VALUE


def _interpret(st):
  if st.interpret is True:
    return mg.interpret_params()
  return st.interpret or None


def _div(x, n: int):
  return x if n == 1 else lax.div(x, jnp.int32(n))


class _Tile:
  """Index arrays of one score tile in registers: `[queries, keys]` when `rows_are_queries`, else `[keys, queries]`
  (the dK/dV kernel's transposed scores)."""

  def __init__(self, st: FlexStatic, lay, shape, bi, hi, q_tile, kv_tile, rows_are_queries: bool):
    self.st = st
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=lay.WGMMA)
    cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=lay.WGMMA)
    q_local, k_local = (rows, cols) if rows_are_queries else (cols, rows)
    self.b, self.h = bi, hi
    self.q_idx = q_tile * st.q_block + q_local
    self.kv_idx = kv_tile * st.kv_block + k_local

  def modded(self, s):
    if self.st.score_mod is None:
      return s
    return jnp.asarray(self.st.score_mod(s, self.b, self.h, self.q_idx, self.kv_idx), jnp.float32)

  def mask(self, s, partial: bool, bias, bits=None):
    if partial and bits is not None:
      s = s + bits.astype(jnp.float32)
    elif partial and self.st.mask_mod is not None:
      s = jnp.where(jnp.asarray(self.st.mask_mod(self.b, self.h, self.q_idx, self.kv_idx), bool), s, -jnp.inf)
    return s if bias is None else s + bias

  def drop_scale(self, seed):
    st = self.st
    if st.rate <= 0.0:
      return None
    keep = dropout_keep(seed, self.b * st.heads + self.h, self.q_idx, self.kv_idx, st.rate)
    return jnp.where(keep, 1.0 / (1.0 - st.rate), 0.0)


def _row(st: FlexStatic, bi, hi, t, tiles: int):
  bt = bi if st.table_batch > 1 else 0
  rt = _div(hi * st.table_heads, st.heads)
  return (bt * st.table_heads + rt) * tiles + t


def _two_streams(num_full, num_part, tile_of, fetch_tile, body, carry, barriers, fetch_bits=None, bits_barrier=None):
  """The row's full tiles then its partial ones, each list double-buffered; `body(tile, slot, carry, partial)`.
  `fetch_bits(step, slot)`: also copies a partial step's bitmap (its barrier `bits_barrier`)."""
  for partial, count in ((False, num_full), (True, num_part)):
    with_bits = partial and fetch_bits is not None

    def fetch(step, slot, p=partial, with_bits=with_bits):
      fetch_tile(tile_of(step, p), slot)
      if with_bits:
        fetch_bits(step, slot)

    carry = mg.stream(count, fetch, lambda step, slot, c, p=partial: body(tile_of(step, p), slot, c, p), carry,
                      tuple(barriers) + ((bits_barrier,) if with_bits else ()))
  return carry


def _bits_scratch(st: FlexStatic, shape):
  """Double-buffered bitmap tiles and their barriers (none without bitmaps)."""
  if not st.has_bitmaps:
    return []
  return [mg.smem((2, *shape), jnp.bfloat16), plgpu.Barrier(num_barriers=2)]


def _key_bias(kvm, b: int):
  """float32 `[B, Lk]`: 0 for a real key, -inf for padding (from the driver's int32 key tiles)."""
  return jnp.where(kvm.reshape(b, -1) != 0, 0.0, -jnp.inf).astype(jnp.float32)


def forward(st: FlexStatic, q5, k, v, kvm, seed, tables, bits=None):
  """q5 [B, P, gp, Lq, D], k, v [B, Hkv, Lk, D] -> (o like q5, lse [B, P, gp, Lq] float32)."""
  b, progs, gp, lq, d = q5.shape
  h, g = st.heads, st.heads // st.kv_heads
  q = q5.reshape(b, h, lq, d)
  bq, bkv = st.q_block, st.kv_block
  kf, kp, _, _ = table_widths(st, tables)
  has_mask = kvm is not None
  lay = mg.Layouts(interpreting=bool(st.interpret))
  kT = jnp.swapaxes(k, 2, 3)

  def kernel(nf_ref, fidx_ref, np_ref, pidx_ref, seed_ref, q_ref, kT_ref, v_ref, *rest):
    bias_ref, rest = (rest[0], rest[1:]) if has_mask else (None, rest)
    bits_ref, rest = (rest[0], rest[1:]) if st.has_bitmaps else (None, rest)
    o_ref, lse_ref, scratch = rest[0], rest[1], rest[2:]
    q_smem, kT_smem, v_smem, bias_smem, p_smem, lse_smem, q_bar, k_bar, v_bar, b_bar = scratch[:10]
    bits_smem, bits_bar = scratch[10:] if st.has_bitmaps else (None, None)
    i, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    kh = _div(hi, g)
    row = _row(st, bi, hi, i, st.q_tiles)

    def tile_of(step, partial):
      return pidx_ref[row * kp + step] if partial else fidx_ref[row * kf + step]

    plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, pl.ds(i * bq, bq)], q_smem, q_bar.at[0])

    def fetch(j, slot):
      plgpu.copy_gmem_to_smem(kT_ref.at[bi, kh, :, pl.ds(j * bkv, bkv)], kT_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, kh, pl.ds(j * bkv, bkv)], v_smem.at[slot], v_bar.at[slot])
      if has_mask:
        plgpu.copy_gmem_to_smem(bias_ref.at[bi, pl.ds(j * bkv, bkv)], bias_smem.at[slot], b_bar.at[slot])

    plgpu.barrier_wait(q_bar.at[0])

    def fetch_bits(step, slot):
      plgpu.copy_gmem_to_smem(bits_ref.at[row * kp + step], bits_smem.at[slot], bits_bar.at[slot])

    def body(j, slot, carry, partial):
      acc, m, l = carry
      bias = None
      if has_mask:
        bias = lax.broadcast_in_dim(mg.load(bias_smem.at[slot], lay.COL), (bq, bkv), [1])
      bits = mg.load(bits_smem.at[slot], lay.WGMMA) if partial and st.has_bitmaps else None
      tile = _Tile(st, lay, (bq, bkv), bi, hi, i, j, rows_are_queries=True)
      s = tile.mask(tile.modded(mg.mma(q_smem, kT_smem.at[slot], (bq, bkv)) * st.scale), partial, bias, bits)
      m_next = jnp.maximum(m, s.max(axis=1))
      p = jnp.exp(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
      alpha = jnp.exp(m - m_next)
      l = l * alpha + p.sum(axis=1)
      drop = tile.drop_scale(seed_ref[0])
      mg.stage(p_smem, p if drop is None else p * drop)
      pv = mg.mma(p_smem, v_smem.at[slot], (bq, d))
      return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_next, l

    barriers = (k_bar, v_bar, b_bar) if has_mask else (k_bar, v_bar)
    init = (mg.full((bq, d), 0.0, lay.WGMMA), mg.full((bq,), _M_INIT, lay.ROW), mg.full((bq,), 0.0, lay.ROW))
    acc, m, l = _two_streams(nf_ref[row], np_ref[row], tile_of, fetch, body, init, barriers,
                             fetch_bits if st.has_bitmaps else None, bits_bar)
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    inv = jnp.where(seen, 1.0 / safe_l, 0.0)
    o_smem = q_smem
    o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(o_smem.dtype)
    lse_smem[...] = jnp.where(seen, m + jnp.log(safe_l), MASK_VALUE)  # a row without keys (pallas_tpu)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, hi, pl.ds(i * bq, bq)])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(i * bq, bq)])
    plgpu.wait_smem_to_gmem(0)

  dt = q.dtype
  scratch = [mg.smem((bq, d), dt), mg.smem((2, d, bkv), dt), mg.smem((2, bkv, d), dt),
             plgpu.SMEM((2, bkv), jnp.float32), mg.smem((bq, bkv), dt), plgpu.SMEM((bq,), jnp.float32),
             plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
             plgpu.Barrier(num_barriers=2)] + _bits_scratch(st, (bq, bkv))
  args = [*tables[:4], seed, q, kT, v]
  if has_mask:
    args.append(_key_bias(kvm, b))
  if st.has_bitmaps:
    args.append(bits)
  o, lse = plgpu.kernel(
      kernel, out_type=[jax.ShapeDtypeStruct((b, h, lq, d), q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
      scratch_types=scratch, grid=(st.q_tiles, h, b), grid_names=("q", "h", "b"), kernel_name="flex_fwd",
      interpret=_interpret(st))(*args)
  return o.reshape(q5.shape), lse.reshape(q5.shape[:-1])


def _dq(st, q, k, v, bias, seed, tables, bits, do, lse, delta):
  b, h, lq, d = q.shape
  g = st.heads // st.kv_heads
  bq, bkv = st.q_block, st.kv_block
  kf, kp, _, _ = table_widths(st, tables)
  has_mask = bias is not None
  lay = mg.Layouts(interpreting=bool(st.interpret))
  kT, vT = jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3)

  def kernel(nf_ref, fidx_ref, np_ref, pidx_ref, seed_ref, q_ref, k_ref, kT_ref, vT_ref, do_ref, lse_ref, delta_ref,
             *rest):
    bias_ref, rest = (rest[0], rest[1:]) if has_mask else (None, rest)
    bits_ref, rest = (rest[0], rest[1:]) if st.has_bitmaps else (None, rest)
    dq_ref, scratch = rest[0], rest[1:]
    (q_smem, do_smem, lse_smem, delta_smem, k_smem, kT_smem, vT_smem, bias_smem, ds_smem,
     own_bar, k_bar, kT_bar, vT_bar, b_bar) = scratch[:14]
    bits_smem, bits_bar = scratch[14:] if st.has_bitmaps else (None, None)
    i, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    kh = _div(hi, g)
    row = _row(st, bi, hi, i, st.q_tiles)

    def tile_of(step, partial):
      return pidx_ref[row * kp + step] if partial else fidx_ref[row * kf + step]

    rows = pl.ds(i * bq, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, rows], q_smem, own_bar.at[0])
    plgpu.copy_gmem_to_smem(do_ref.at[bi, hi, rows], do_smem, own_bar.at[1])
    plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem, own_bar.at[2])
    plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem, own_bar.at[3])

    def fetch(j, slot):
      cols = pl.ds(j * bkv, bkv)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, kh, cols], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(kT_ref.at[bi, kh, :, cols], kT_smem.at[slot], kT_bar.at[slot])
      plgpu.copy_gmem_to_smem(vT_ref.at[bi, kh, :, cols], vT_smem.at[slot], vT_bar.at[slot])
      if has_mask:
        plgpu.copy_gmem_to_smem(bias_ref.at[bi, cols], bias_smem.at[slot], b_bar.at[slot])

    for n in range(4):
      plgpu.barrier_wait(own_bar.at[n])
    lse_r, delta_r = mg.load(lse_smem, lay.ROW), mg.load(delta_smem, lay.ROW)

    def fetch_bits(step, slot):
      plgpu.copy_gmem_to_smem(bits_ref.at[row * kp + step], bits_smem.at[slot], bits_bar.at[slot])

    def body(j, slot, dq, partial):
      bias_t = None
      if has_mask:
        bias_t = lax.broadcast_in_dim(mg.load(bias_smem.at[slot], lay.COL), (bq, bkv), [1])
      bits = mg.load(bits_smem.at[slot], lay.WGMMA) if partial and st.has_bitmaps else None
      tile = _Tile(st, lay, (bq, bkv), bi, hi, i, j, rows_are_queries=True)
      raw = mg.mma(q_smem, kT_smem.at[slot], (bq, bkv)) * st.scale
      if st.score_mod is None:
        s, pull = raw, None
      else:
        s, pull = jax.vjp(tile.modded, raw)
      s = tile.mask(s, partial, bias_t, bits)
      p = jnp.exp(s - lax.broadcast_in_dim(lse_r, s.shape, [0]))
      dp = mg.mma(do_smem, vT_smem.at[slot], (bq, bkv))
      drop = tile.drop_scale(seed_ref[0])
      if drop is not None:
        dp = dp * drop
      ds = p * (dp - lax.broadcast_in_dim(delta_r, s.shape, [0]))
      if pull is not None:
        ds = pull(ds)[0]
      mg.stage(ds_smem, ds)
      return dq + mg.mma(ds_smem, k_smem.at[slot], (bq, d))

    barriers = (k_bar, kT_bar, vT_bar, b_bar) if has_mask else (k_bar, kT_bar, vT_bar)
    dq = _two_streams(nf_ref[row], np_ref[row], tile_of, fetch, body, mg.full((bq, d), 0.0, lay.WGMMA), barriers,
                      fetch_bits if st.has_bitmaps else None, bits_bar)
    dq_smem = q_smem
    dq_smem[...] = (dq * st.scale).astype(dq_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bi, hi, rows])
    plgpu.wait_smem_to_gmem(0)

  dt = q.dtype
  scratch = [mg.smem((bq, d), dt), mg.smem((bq, d), dt), plgpu.SMEM((bq,), jnp.float32),
             plgpu.SMEM((bq,), jnp.float32), mg.smem((2, bkv, d), dt), mg.smem((2, d, bkv), dt),
             mg.smem((2, d, bkv), dt), plgpu.SMEM((2, bkv), jnp.float32), mg.smem((bq, bkv), dt),
             plgpu.Barrier(num_barriers=4)] + [plgpu.Barrier(num_barriers=2)] * 4 + _bits_scratch(st, (bq, bkv))
  args = [*tables[:4], seed, q, k, kT, vT, do, lse, delta]
  if has_mask:
    args.append(bias)
  if st.has_bitmaps:
    args.append(bits)
  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((b, h, lq, d), q.dtype), scratch_types=scratch,
                      grid=(st.q_tiles, h, b), grid_names=("q", "h", "b"), kernel_name="flex_bwd_dq",
                      interpret=_interpret(st))(*args)


def _dkv(st, q, k, v, bias, seed, tables, bitsT, do, lse, delta):
  b, h, lq, d = q.shape
  lk = k.shape[2]
  g = st.heads // st.kv_heads
  bq, bkv = st.q_block, st.kv_block
  _, _, qf, qp = table_widths(st, tables)
  has_mask = bias is not None
  lay = mg.Layouts(interpreting=bool(st.interpret))
  qT, doT = jnp.swapaxes(q, 2, 3), jnp.swapaxes(do, 2, 3)

  def kernel(nf_ref, fidx_ref, np_ref, pidx_ref, seed_ref, q_ref, qT_ref, k_ref, v_ref, do_ref, doT_ref, lse_ref,
             delta_ref, *rest):
    bias_ref, rest = (rest[0], rest[1:]) if has_mask else (None, rest)
    (pos_ref, bits_ref), rest = (rest[:2], rest[2:]) if st.has_bitmaps else ((None, None), rest)
    dk_ref, dv_ref, scratch = rest[0], rest[1], rest[2:]
    (k_smem, v_smem, bias_smem, q_smem, qT_smem, do_smem, doT_smem, lse_smem, delta_smem, p_smem, ds_smem,
     own_bar, q_bar, qT_bar, do_bar, doT_bar, lse_bar, delta_bar) = scratch[:18]
    bits_smem, bits_bar = scratch[18:] if st.has_bitmaps else (None, None)
    j, hi, bi = lax.axis_index("kv"), lax.axis_index("h"), lax.axis_index("b")
    kh = _div(hi, g)
    col = _row(st, bi, hi, j, st.kv_tiles)

    def tile_of(step, partial):
      return pidx_ref[col * qp + step] if partial else fidx_ref[col * qf + step]

    keys = pl.ds(j * bkv, bkv)
    plgpu.copy_gmem_to_smem(k_ref.at[bi, kh, keys], k_smem, own_bar.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[bi, kh, keys], v_smem, own_bar.at[1])
    if has_mask:
      plgpu.copy_gmem_to_smem(bias_ref.at[bi, keys], bias_smem, own_bar.at[2])

    def fetch(i, slot):
      rows = pl.ds(i * bq, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, rows], q_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(qT_ref.at[bi, hi, :, rows], qT_smem.at[slot], qT_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[bi, hi, rows], do_smem.at[slot], do_bar.at[slot])
      plgpu.copy_gmem_to_smem(doT_ref.at[bi, hi, :, rows], doT_smem.at[slot], doT_bar.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem.at[slot], lse_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem.at[slot], delta_bar.at[slot])

    for n in range(3 if has_mask else 2):
      plgpu.barrier_wait(own_bar.at[n])
    bias_t = None
    if has_mask:  # keys are the rows here
      bias_t = lax.broadcast_in_dim(mg.load(bias_smem, lay.ROW), (bkv, bq), [0])

    def fetch_bits(step, slot):  # the forward's bitmap of (query tile, this key tile), transposed
      plgpu.copy_gmem_to_smem(bits_ref.at[pos_ref[col * qp + step]], bits_smem.at[slot], bits_bar.at[slot])

    def body(i, slot, carry, partial):
      dk, dv = carry
      bits = mg.load(bits_smem.at[slot], lay.WGMMA) if partial and st.has_bitmaps else None
      lse_c = lax.broadcast_in_dim(mg.load(lse_smem.at[slot], lay.COL), (bkv, bq), [1])
      delta_c = lax.broadcast_in_dim(mg.load(delta_smem.at[slot], lay.COL), (bkv, bq), [1])
      tile = _Tile(st, lay, (bkv, bq), bi, hi, i, j, rows_are_queries=False)
      raw = mg.mma(k_smem, qT_smem.at[slot], (bkv, bq)) * st.scale
      if st.score_mod is None:
        sT, pull = raw, None
      else:
        sT, pull = jax.vjp(tile.modded, raw)
      sT = tile.mask(sT, partial, bias_t, bits)
      pT = jnp.exp(sT - lse_c)
      drop = tile.drop_scale(seed_ref[0])
      mg.stage(p_smem, pT if drop is None else pT * drop)
      dv = dv + mg.mma(p_smem, do_smem.at[slot], (bkv, d))
      dpT = mg.mma(v_smem, doT_smem.at[slot], (bkv, bq))
      if drop is not None:
        dpT = dpT * drop
      dsT = pT * (dpT - delta_c)
      if pull is not None:
        dsT = pull(dsT)[0]
      mg.stage(ds_smem, dsT)
      dk = dk + mg.mma(ds_smem, q_smem.at[slot], (bkv, d))
      return dk, dv

    barriers = (q_bar, qT_bar, do_bar, doT_bar, lse_bar, delta_bar)
    init = (mg.full((bkv, d), 0.0, lay.WGMMA), mg.full((bkv, d), 0.0, lay.WGMMA))
    dk, dv = _two_streams(nf_ref[col], np_ref[col], tile_of, fetch, body, init, barriers,
                          fetch_bits if st.has_bitmaps else None, bits_bar)
    dk_smem, dv_smem = k_smem, v_smem
    dk_smem[...] = (dk * st.scale).astype(dk_smem.dtype)
    dv_smem[...] = dv.astype(dv_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[bi, hi, keys])
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[bi, hi, keys])
    plgpu.wait_smem_to_gmem(0)

  dt = q.dtype
  scratch = [mg.smem((bkv, d), dt), mg.smem((bkv, d), dt), plgpu.SMEM((bkv,), jnp.float32),
             mg.smem((2, bq, d), dt), mg.smem((2, d, bq), dt), mg.smem((2, bq, d), dt), mg.smem((2, d, bq), dt),
             plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32), mg.smem((bkv, bq), dt),
             mg.smem((bkv, bq), dt), plgpu.Barrier(num_barriers=3)] + [plgpu.Barrier(num_barriers=2)] * 6
  scratch += _bits_scratch(st, (bkv, bq))
  args = [*tables[4:8], seed, q, qT, k, v, do, doT, lse, delta]
  if has_mask:
    args.append(bias)
  if st.has_bitmaps:
    args += [tables[8], bitsT]
  return plgpu.kernel(kernel, out_type=[jax.ShapeDtypeStruct((b, h, lk, d), k.dtype),
                                        jax.ShapeDtypeStruct((b, h, lk, d), v.dtype)],
                      scratch_types=scratch, grid=(st.kv_tiles, h, b), grid_names=("kv", "h", "b"),
                      kernel_name="flex_bwd_dkv", interpret=_interpret(st))(*args)


def backward(st: FlexStatic, q5, k, v, kvm, seed, tables, bits, do5, lse4, delta4):
  """-> (dq like q5, dk, dv like k, v); dK/dV of a group's query heads summed here."""
  b, progs, gp, lq, d = q5.shape
  h = st.heads
  q, do = q5.reshape(b, h, lq, d), do5.reshape(b, h, lq, d)
  lse, delta = lse4.reshape(b, h, lq), delta4.reshape(b, h, lq)
  bias = None if kvm is None else _key_bias(kvm, b)
  dq = _dq(st, q, k, v, bias, seed, tables, bits, do, lse, delta)
  bitsT = None if bits is None else jnp.swapaxes(bits, 1, 2)  # the dK/dV kernel's scores are [keys, queries]
  dk, dv = _dkv(st, q, k, v, bias, seed, tables, bitsT, do, lse, delta)
  g = h // st.kv_heads
  if g > 1:
    lk = k.shape[2]
    dk = dk.astype(jnp.float32).reshape(b, st.kv_heads, g, lk, d).sum(2)
    dv = dv.astype(jnp.float32).reshape(b, st.kv_heads, g, lk, d).sum(2)
  return dq.reshape(q5.shape), dk.astype(k.dtype), dv.astype(v.dtype)


__all__ = ["backward", "forward"]
