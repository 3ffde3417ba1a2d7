"""Mosaic GPU (Hopper) kernels of block-sparse attention; see `pallas_tpu` for the algorithm, `tables` for the index
lists and `pallas` for the custom_vjp that joins `forward` and `backward`. One warpgroup per program, one kernel
call per row group (sparse rows, dense rows: a global tile does not widen the other rows' grids):
  forward / dQ:  program (group row = query tile, head, batch) walks its list of key tiles;
  dK / dV:       program (group row = key tile, head, batch) walks its list of query tiles.
The tables are read from global memory (Mosaic GPU has no scalar prefetch); the listed tiles are double-buffered
into shared memory by TMA (`kernels.mosaic_gpu.stream`). Matmuls are wgmma with float32 accumulators; softmax
statistics live in registers (per-row vectors of the wgmma layout). Tensors are `[B, H, L, D]`; K (forward, dQ),
V (dQ), Q and dO (dK/dV) are also passed transposed (`[B, H, D, L]`, transposed by XLA) so that every wgmma B
operand is a plain shared-memory tile, and probabilities reach the second matmul through shared memory (see
`kernels.mosaic_gpu`). Dropout: the hash mask of `common.dropout_keep` on register tiles, regenerated in the backward.
Layout blocks smaller than a tile (16 or 32 tokens under 64-token tiles): a tile is listed when any of its blocks is
allowed, and the listed tile's bits (`tables.tile_bits`) mask the others (`_mask_sub_blocks`); lengths are padded to
a whole tile by the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_gpu as mg
from kernels.block_sparse.tables import KernelStatic, merge_groups
from kernels.common import MASK_VALUE, dropout_keep

_M_INIT = MASK_VALUE  # finite running-max start; masked scores are -inf, so exp(s - m) is 0 for them, never NaN


def _interpret(st):
  if st.interpret is True:
    return mg.interpret_params()
  return st.interpret or None


def _layouts(st) -> mg.Layouts:
  return mg.Layouts(interpreting=bool(st.interpret))


def _key_bias(key_mask_BxL):
  """0 for a key that may be attended, -inf for a padded one (added to the scores)."""
  return jnp.where(key_mask_BxL, 0.0, -jnp.inf).astype(jnp.float32)


def _drop_scale(st: KernelStatic, seed, shape, q_tile, kv_tile, bi, hi, *, rows_are_queries, lay):
  """float32 factor 1 / (1 - rate) (kept) or 0 (dropped) on a score tile; None without dropout."""
  if st.dropout_rate <= 0.0:
    return None
  rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=lay.WGMMA)
  cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=lay.WGMMA)
  q_idx, k_idx = (rows, cols) if rows_are_queries else (cols, rows)
  keep = dropout_keep(seed, bi * st.heads + hi, q_tile * st.block_q + q_idx, kv_tile * st.block_kv + k_idx,
                      st.dropout_rate)
  return jnp.where(keep, 1.0 / (1.0 - st.dropout_rate), 0.0)


def _mask_scores(s, q_tile, kv_tile, bias_col, *, causal, rows_are_queries, block_q, block_kv, lay):
  """Masks `s` ([queries, keys] if rows_are_queries, else [keys, queries]) with -inf."""
  if causal:
    rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=lay.WGMMA)
    cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=lay.WGMMA)
    if rows_are_queries:
      allowed = kv_tile * block_kv + cols <= q_tile * block_q + rows
    else:
      allowed = kv_tile * block_kv + rows <= q_tile * block_q + cols
    s = jnp.where(allowed, s, -jnp.inf)
  if bias_col is not None:
    s = s + bias_col
  return s


def _lists(group) -> list[jax.Array]:
  """A group's tables as kernel inputs: tile ids, listed tiles, counts and (one unused entry when tiles lie inside
  layout blocks) the listed tiles' sub-block bits."""
  bits = group.bits if group.bits is not None else np.zeros(1, np.int32)
  return [jnp.asarray(group.ids), jnp.asarray(group.index), jnp.asarray(group.count), jnp.asarray(bits)]


def _mask_sub_blocks(st: KernelStatic, s, bits_ref, entry, *, rows_are_queries, lay):
  """-inf where a tile spanning several layout blocks covers a block pair the layout does not allow: bit
  `a * c + b` of `bits_ref[entry]` (`tables.tile_bits`) for query block a and key block b of the tile. Identity
  otherwise (the table is then a single unused entry, never read)."""
  if st.sub_blocks == (1, 1):
    return s
  bits = bits_ref[entry]
  shift = st.layout_block.bit_length() - 1  # layout blocks under a 64-token tile are powers of two
  const = lambda c: lax.broadcast(np.int32(c), s.shape)  # noqa: E731  (no full_like: see common._shr)
  rows = lax.shift_right_logical(plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=lay.WGMMA), const(shift))
  cols = lax.shift_right_logical(plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=lay.WGMMA), const(shift))
  q_block, k_block = (rows, cols) if rows_are_queries else (cols, rows)
  bit = q_block * st.sub_blocks[1] + k_block
  allowed = lax.shift_right_logical(lax.broadcast(bits, s.shape), bit) & 1
  return jnp.where(allowed != 0, s, -jnp.inf)


def forward(st: KernelStatic, q, k, v, key_mask, seed):
  """q, k, v: [B, H, L, D] -> (o [B, H, L, D], lse [B, H, L] float32); one kernel call per row group."""
  outs, lses = [], []
  for group in st.tables.kv_groups:
    o, lse = _forward_group(st, group, q, k, v, key_mask, seed)
    outs.append(o)
    lses.append(lse[..., None])
  groups = st.tables.kv_groups
  return merge_groups(outs, groups, st.block_q), merge_groups(lses, groups, st.block_q)[..., 0]


def _forward_group(st: KernelStatic, group, q, k, v, key_mask, seed):
  b, h, length, d = q.shape
  t = st.tables
  bq, bkv, kw, nr = st.block_q, st.block_kv, group.width, group.rows
  hs = 1 if t.layout_heads > 1 else 0
  has_mask = key_mask is not None
  lay = _layouts(st)
  kT = jnp.swapaxes(k, 2, 3)

  def kernel(ids_ref, kv_index_ref, kv_count_ref, bits_ref, seed_ref, q_ref, kT_ref, v_ref, *rest):
    if has_mask:
      bias_ref, o_ref, lse_ref, scratch = rest[0], rest[1], rest[2], rest[3:]
    else:
      bias_ref, (o_ref, lse_ref), scratch = None, rest[:2], rest[2:]
    q_smem, kT_smem, v_smem, bias_smem, p_smem, lse_smem, q_bar, k_bar, v_bar, b_bar = scratch
    r, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    i = ids_ref[r]
    row = hi * hs * nr + r
    count = kv_count_ref[row]

    plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, pl.ds(i * bq, bq)], q_smem, q_bar.at[0])

    def fetch(step, slot):
      j = kv_index_ref[row * kw + step]
      plgpu.copy_gmem_to_smem(kT_ref.at[bi, hi, :, pl.ds(j * bkv, bkv)], kT_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, pl.ds(j * bkv, bkv)], v_smem.at[slot], v_bar.at[slot])
      if has_mask:
        plgpu.copy_gmem_to_smem(bias_ref.at[bi, pl.ds(j * bkv, bkv)], bias_smem.at[slot], b_bar.at[slot])

    plgpu.barrier_wait(q_bar.at[0])

    def body(step, slot, carry):
      acc, m, l = carry
      j = kv_index_ref[row * kw + step]
      bias = None
      if has_mask:
        bias = lax.broadcast_in_dim(mg.load(bias_smem.at[slot], lay.COL), (bq, bkv), [1])
      s = mg.mma(q_smem, kT_smem.at[slot], (bq, bkv)) * st.scale
      s = _mask_scores(s, i, j, bias, causal=st.causal, rows_are_queries=True, block_q=bq, block_kv=bkv, lay=lay)
      s = _mask_sub_blocks(st, s, bits_ref, row * kw + step, rows_are_queries=True, lay=lay)
      m_next = jnp.maximum(m, s.max(axis=1))
      p = jnp.exp(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
      alpha = jnp.exp(m - m_next)
      l = l * alpha + p.sum(axis=1)  # the normalizer sees every allowed weight, dropped or not
      drop = _drop_scale(st, seed_ref[0], s.shape, i, j, bi, hi, rows_are_queries=True, lay=lay)
      mg.stage(p_smem, p if drop is None else p * drop)
      pv = mg.mma(p_smem, v_smem.at[slot], (bq, d))
      return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_next, l

    barriers = (k_bar, v_bar, b_bar) if has_mask else (k_bar, v_bar)
    init = (mg.full((bq, d), 0.0, lay.WGMMA), mg.full((bq,), _M_INIT, lay.ROW), mg.full((bq,), 0.0, lay.ROW))
    acc, m, l = mg.stream(count, fetch, body, init, barriers)

    seen = l > 0.0  # False only for a row without a single unmasked key
    safe_l = jnp.where(seen, l, 1.0)
    inv = jnp.where(seen, 1.0 / safe_l, 0.0)
    o_smem = q_smem  # free now (the store waits for every warp's reads: Pallas puts a barrier before it)
    o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(o_smem.dtype)
    lse_smem[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, hi, pl.ds(r * bq, bq)])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(r * bq, bq)])
    plgpu.wait_smem_to_gmem(0)

  dt = q.dtype
  scratch = [mg.smem((bq, d), dt), mg.smem((2, d, bkv), dt), mg.smem((2, bkv, d), dt),
             plgpu.SMEM((2, bkv), jnp.float32), mg.smem((bq, bkv), dt),
             plgpu.SMEM((bq,), jnp.float32), plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=2),
             plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2)]
  args = [*_lists(group), seed, q, kT, v]
  if has_mask:
    args.append(_key_bias(key_mask))
  return plgpu.kernel(
      kernel, out_type=[jax.ShapeDtypeStruct((b, h, nr * bq, d), q.dtype),
                        jax.ShapeDtypeStruct((b, h, nr * bq), jnp.float32)],
      scratch_types=scratch, grid=(nr, h, b), grid_names=("q", "h", "b"), kernel_name="block_sparse_fwd",
      interpret=_interpret(st))(*args)


def _dq(st: KernelStatic, group, q, k, v, key_mask, seed, do, lse, delta):
  b, h, length, d = q.shape
  t = st.tables
  bq, bkv, kw, nr = st.block_q, st.block_kv, group.width, group.rows
  hs = 1 if t.layout_heads > 1 else 0
  has_mask = key_mask is not None
  lay = _layouts(st)
  kT, vT = jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3)

  def kernel(ids_ref, kv_index_ref, kv_count_ref, bits_ref, seed_ref, q_ref, k_ref, kT_ref, vT_ref, do_ref, lse_ref,
             delta_ref, *rest):
    if has_mask:
      bias_ref, dq_ref, scratch = rest[0], rest[1], rest[2:]
    else:
      bias_ref, dq_ref, scratch = None, rest[0], rest[1:]
    (q_smem, do_smem, lse_smem, delta_smem, k_smem, kT_smem, vT_smem, bias_smem, ds_smem,
     own_bar, k_bar, kT_bar, vT_bar, b_bar) = scratch
    r, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    i = ids_ref[r]
    row = hi * hs * nr + r
    count = kv_count_ref[row]
    rows = pl.ds(i * bq, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, rows], q_smem, own_bar.at[0])
    plgpu.copy_gmem_to_smem(do_ref.at[bi, hi, rows], do_smem, own_bar.at[1])
    plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem, own_bar.at[2])
    plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem, own_bar.at[3])

    def fetch(step, slot):
      j = kv_index_ref[row * kw + step]
      cols = pl.ds(j * bkv, bkv)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, hi, cols], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(kT_ref.at[bi, hi, :, cols], kT_smem.at[slot], kT_bar.at[slot])
      plgpu.copy_gmem_to_smem(vT_ref.at[bi, hi, :, cols], vT_smem.at[slot], vT_bar.at[slot])
      if has_mask:
        plgpu.copy_gmem_to_smem(bias_ref.at[bi, cols], bias_smem.at[slot], b_bar.at[slot])

    for n in range(4):
      plgpu.barrier_wait(own_bar.at[n])
    lse, delta = mg.load(lse_smem, lay.ROW), mg.load(delta_smem, lay.ROW)  # per query row

    def body(step, slot, dq):
      j = kv_index_ref[row * kw + step]
      bias = None
      if has_mask:
        bias = lax.broadcast_in_dim(mg.load(bias_smem.at[slot], lay.COL), (bq, bkv), [1])
      s = mg.mma(q_smem, kT_smem.at[slot], (bq, bkv)) * st.scale
      s = _mask_scores(s, i, j, bias, causal=st.causal, rows_are_queries=True, block_q=bq, block_kv=bkv, lay=lay)
      s = _mask_sub_blocks(st, s, bits_ref, row * kw + step, rows_are_queries=True, lay=lay)
      p = jnp.exp(s - lax.broadcast_in_dim(lse, s.shape, [0]))
      dp = mg.mma(do_smem, vT_smem.at[slot], (bq, bkv))
      drop = _drop_scale(st, seed_ref[0], s.shape, i, j, bi, hi, rows_are_queries=True, lay=lay)
      if drop is not None:
        dp = dp * drop
      mg.stage(ds_smem, p * (dp - lax.broadcast_in_dim(delta, s.shape, [0])))
      return dq + mg.mma(ds_smem, k_smem.at[slot], (bq, d))

    barriers = (k_bar, kT_bar, vT_bar, b_bar) if has_mask else (k_bar, kT_bar, vT_bar)
    dq = mg.stream(count, fetch, body, mg.full((bq, d), 0.0, lay.WGMMA), barriers)
    dq_smem = q_smem  # free now
    dq_smem[...] = (dq * st.scale).astype(dq_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bi, hi, pl.ds(r * bq, bq)])
    plgpu.wait_smem_to_gmem(0)

  dt = q.dtype
  scratch = [mg.smem((bq, d), dt), mg.smem((bq, d), dt), plgpu.SMEM((bq,), jnp.float32),
             plgpu.SMEM((bq,), jnp.float32), mg.smem((2, bkv, d), dt), mg.smem((2, d, bkv), dt),
             mg.smem((2, d, bkv), dt), plgpu.SMEM((2, bkv), jnp.float32), mg.smem((bq, bkv), dt),
             plgpu.Barrier(num_barriers=4)] + [plgpu.Barrier(num_barriers=2)] * 4
  args = [*_lists(group), seed, q, k, kT, vT, do, lse, delta]
  if has_mask:
    args.append(_key_bias(key_mask))
  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((b, h, nr * bq, d), q.dtype), scratch_types=scratch,
                      grid=(nr, h, b), grid_names=("q", "h", "b"), kernel_name="block_sparse_bwd_dq",
                      interpret=_interpret(st))(*args)


def _dkv(st: KernelStatic, group, q, k, v, key_mask, seed, do, lse, delta):
  b, h, length, d = q.shape
  t = st.tables
  bq, bkv, qw, nr = st.block_q, st.block_kv, group.width, group.rows
  hs = 1 if t.layout_heads > 1 else 0
  has_mask = key_mask is not None
  lay = _layouts(st)
  qT, doT = jnp.swapaxes(q, 2, 3), jnp.swapaxes(do, 2, 3)

  def kernel(ids_ref, q_index_ref, q_count_ref, bits_ref, seed_ref, q_ref, qT_ref, k_ref, v_ref, do_ref, doT_ref,
             lse_ref, delta_ref, *rest):
    if has_mask:
      bias_ref, dk_ref, dv_ref, scratch = rest[0], rest[1], rest[2], rest[3:]
    else:
      bias_ref, (dk_ref, dv_ref), scratch = None, rest[:2], rest[2:]
    (k_smem, v_smem, bias_smem, q_smem, qT_smem, do_smem, doT_smem, lse_smem, delta_smem, p_smem, ds_smem,
     own_bar, q_bar, qT_bar, do_bar, doT_bar, lse_bar, delta_bar) = scratch
    r, hi, bi = lax.axis_index("kv"), lax.axis_index("h"), lax.axis_index("b")
    j = ids_ref[r]
    col = hi * hs * nr + r
    count = q_count_ref[col]
    keys = pl.ds(j * bkv, bkv)
    plgpu.copy_gmem_to_smem(k_ref.at[bi, hi, keys], k_smem, own_bar.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, keys], v_smem, own_bar.at[1])
    if has_mask:
      plgpu.copy_gmem_to_smem(bias_ref.at[bi, keys], bias_smem, own_bar.at[2])

    def fetch(step, slot):
      i = q_index_ref[col * qw + step]
      rows = pl.ds(i * bq, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, rows], q_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(qT_ref.at[bi, hi, :, rows], qT_smem.at[slot], qT_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[bi, hi, rows], do_smem.at[slot], do_bar.at[slot])
      plgpu.copy_gmem_to_smem(doT_ref.at[bi, hi, :, rows], doT_smem.at[slot], doT_bar.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem.at[slot], lse_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem.at[slot], delta_bar.at[slot])

    for n in range(3 if has_mask else 2):
      plgpu.barrier_wait(own_bar.at[n])
    bias = None
    if has_mask:  # keys are the rows here
      bias = lax.broadcast_in_dim(mg.load(bias_smem, lay.ROW), (bkv, bq), [0])

    def body(step, slot, carry):
      dk, dv = carry
      i = q_index_ref[col * qw + step]
      lse = lax.broadcast_in_dim(mg.load(lse_smem.at[slot], lay.COL), (bkv, bq), [1])
      delta = lax.broadcast_in_dim(mg.load(delta_smem.at[slot], lay.COL), (bkv, bq), [1])
      sT = mg.mma(k_smem, qT_smem.at[slot], (bkv, bq)) * st.scale
      sT = _mask_scores(sT, i, j, bias, causal=st.causal, rows_are_queries=False, block_q=bq, block_kv=bkv, lay=lay)
      sT = _mask_sub_blocks(st, sT, bits_ref, col * qw + step, rows_are_queries=False, lay=lay)
      pT = jnp.exp(sT - lse)
      drop = _drop_scale(st, seed_ref[0], sT.shape, i, j, bi, hi, rows_are_queries=False, lay=lay)
      mg.stage(p_smem, pT if drop is None else pT * drop)
      dv = dv + mg.mma(p_smem, do_smem.at[slot], (bkv, d))
      dpT = mg.mma(v_smem, doT_smem.at[slot], (bkv, bq))
      if drop is not None:
        dpT = dpT * drop
      mg.stage(ds_smem, pT * (dpT - delta))
      dk = dk + mg.mma(ds_smem, q_smem.at[slot], (bkv, d))
      return dk, dv

    barriers = (q_bar, qT_bar, do_bar, doT_bar, lse_bar, delta_bar)
    init = (mg.full((bkv, d), 0.0, lay.WGMMA), mg.full((bkv, d), 0.0, lay.WGMMA))
    dk, dv = mg.stream(count, fetch, body, init, barriers)
    dk_smem, dv_smem = k_smem, v_smem  # free now
    dk_smem[...] = (dk * st.scale).astype(dk_smem.dtype)
    dv_smem[...] = dv.astype(dv_smem.dtype)
    plgpu.commit_smem()
    out_rows = pl.ds(r * bkv, bkv)
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[bi, hi, out_rows])
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[bi, hi, out_rows])
    plgpu.wait_smem_to_gmem(0)

  dt = q.dtype
  scratch = [mg.smem((bkv, d), dt), mg.smem((bkv, d), dt), plgpu.SMEM((bkv,), jnp.float32),
             mg.smem((2, bq, d), dt), mg.smem((2, d, bq), dt), mg.smem((2, bq, d), dt), mg.smem((2, d, bq), dt),
             plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32), mg.smem((bkv, bq), dt),
             mg.smem((bkv, bq), dt), plgpu.Barrier(num_barriers=3)] + [plgpu.Barrier(num_barriers=2)] * 6
  args = [*_lists(group), seed, q, qT, k, v, do, doT, lse, delta]
  if has_mask:
    args.append(_key_bias(key_mask))
  return plgpu.kernel(kernel, out_type=[jax.ShapeDtypeStruct((b, h, nr * bkv, d), k.dtype),
                                        jax.ShapeDtypeStruct((b, h, nr * bkv, d), v.dtype)],
                      scratch_types=scratch, grid=(nr, h, b), grid_names=("kv", "h", "b"),
                      kernel_name="block_sparse_bwd_dkv", interpret=_interpret(st))(*args)


def backward(st: KernelStatic, q, k, v, key_mask, seed, do, lse, delta):
  """-> (dq, dk, dv) from the forward's log-sum-exp and `delta = rowsum(o * do)` ([B, H, L] float32 each)."""
  t = st.tables
  dqs = [_dq(st, g, q, k, v, key_mask, seed, do, lse, delta) for g in t.kv_groups]
  dkvs = [_dkv(st, g, q, k, v, key_mask, seed, do, lse, delta) for g in t.q_groups]
  return (merge_groups(dqs, t.kv_groups, st.block_q), merge_groups([a for a, _ in dkvs], t.q_groups, st.block_kv),
          merge_groups([b for _, b in dkvs], t.q_groups, st.block_kv))


__all__ = ["backward", "forward"]
