"""Mosaic GPU (Hopper) kernels of block-sparse attention; see `kernels.block_sparse_pallas` for the algorithm and the
index tables. One warpgroup per program:
  forward / dQ:  program (query tile, head, batch) walks its list of key tiles;
  dK / dV:       program (key tile, head, batch) walks its list of query tiles.
The tables are read from global memory (Mosaic GPU has no scalar prefetch); the listed tiles are double-buffered
into shared memory by TMA (`mosaic_gpu_utils.stream`). Matmuls are wgmma with float32 accumulators; softmax
statistics live in registers (per-row vectors of the wgmma layout). Tensors are `[B, H, L, D]`; K (forward, dQ),
V (dQ), Q and dO (dK/dV) are also passed transposed (`[B, H, D, L]`, transposed by XLA) so that every wgmma B
operand is a plain shared-memory tile, and probabilities reach the second matmul through shared memory (see
`mosaic_gpu_utils`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_gpu_utils as mg

_M_INIT = -1e30


def _interpret(st):
  if st.interpret is True:
    return mg.interpret_params()
  return st.interpret or None


def _layouts(st) -> mg.Layouts:
  return mg.Layouts(interpreting=bool(st.interpret))


def _kv_bias(kv_mask_BxL):
  """0 for a key that may be attended, -inf for a padded one (added to the scores)."""
  return jnp.where(kv_mask_BxL, 0.0, -jnp.inf).astype(jnp.float32)


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


def forward(st, q, k, v, kv_mask):
  """q, k, v: [B, H, L, D] -> (o [B, H, L, D], lse [B, H, L] float32)."""
  b, h, length, d = q.shape
  t = st.tables
  bq, bkv, kw, nq = st.block_q, st.block_kv, t.kv_width, t.num_q_tiles
  hs = 1 if t.layout_heads > 1 else 0
  has_mask = kv_mask is not None
  lay = _layouts(st)
  kT = jnp.swapaxes(k, 2, 3)

  def kernel(kv_index_ref, kv_count_ref, q_ref, kT_ref, v_ref, *rest):
    if has_mask:
      bias_ref, o_ref, lse_ref, scratch = rest[0], rest[1], rest[2], rest[3:]
    else:
      bias_ref, (o_ref, lse_ref), scratch = None, rest[:2], rest[2:]
    q_smem, kT_smem, v_smem, bias_smem, p_smem, lse_smem, q_bar, k_bar, v_bar, b_bar = scratch
    i, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    row = hi * hs * nq + i
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
      m_next = jnp.maximum(m, s.max(axis=1))
      p = jnp.exp(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
      alpha = jnp.exp(m - m_next)
      l = l * alpha + p.sum(axis=1)
      mg.stage(p_smem, p)
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
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, hi, pl.ds(i * bq, bq)])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(i * bq, bq)])
    plgpu.wait_smem_to_gmem(0)

  dt = q.dtype
  scratch = [mg.smem((bq, d), dt), mg.smem((2, d, bkv), dt), mg.smem((2, bkv, d), dt),
             plgpu.SMEM((2, bkv), jnp.float32), mg.smem((bq, bkv), dt),
             plgpu.SMEM((bq,), jnp.float32), plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=2),
             plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2)]
  args = [jnp.asarray(t.kv_index), jnp.asarray(t.kv_count), q, kT, v]
  if has_mask:
    args.append(_kv_bias(kv_mask))
  return plgpu.kernel(
      kernel, out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, length), jnp.float32)],
      scratch_types=scratch, grid=(nq, h, b), grid_names=("q", "h", "b"), kernel_name="block_sparse_fwd",
      interpret=_interpret(st))(*args)


def _dq(st, q, k, v, kv_mask, do, lse, delta):
  b, h, length, d = q.shape
  t = st.tables
  bq, bkv, kw, nq = st.block_q, st.block_kv, t.kv_width, t.num_q_tiles
  hs = 1 if t.layout_heads > 1 else 0
  has_mask = kv_mask is not None
  lay = _layouts(st)
  kT, vT = jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3)

  def kernel(kv_index_ref, kv_count_ref, q_ref, k_ref, kT_ref, vT_ref, do_ref, lse_ref, delta_ref, *rest):
    if has_mask:
      bias_ref, dq_ref, scratch = rest[0], rest[1], rest[2:]
    else:
      bias_ref, dq_ref, scratch = None, rest[0], rest[1:]
    (q_smem, do_smem, lse_smem, delta_smem, k_smem, kT_smem, vT_smem, bias_smem, ds_smem,
     own_bar, k_bar, kT_bar, vT_bar, b_bar) = scratch
    i, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    row = hi * hs * nq + i
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
      p = jnp.exp(s - lax.broadcast_in_dim(lse, s.shape, [0]))
      dp = mg.mma(do_smem, vT_smem.at[slot], (bq, bkv))
      mg.stage(ds_smem, p * (dp - lax.broadcast_in_dim(delta, s.shape, [0])))
      return dq + mg.mma(ds_smem, k_smem.at[slot], (bq, d))

    barriers = (k_bar, kT_bar, vT_bar, b_bar) if has_mask else (k_bar, kT_bar, vT_bar)
    dq = mg.stream(count, fetch, body, mg.full((bq, d), 0.0, lay.WGMMA), barriers)
    dq_smem = q_smem  # free now
    dq_smem[...] = (dq * st.scale).astype(dq_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bi, hi, rows])
    plgpu.wait_smem_to_gmem(0)

  dt = q.dtype
  scratch = [mg.smem((bq, d), dt), mg.smem((bq, d), dt), plgpu.SMEM((bq,), jnp.float32),
             plgpu.SMEM((bq,), jnp.float32), mg.smem((2, bkv, d), dt), mg.smem((2, d, bkv), dt),
             mg.smem((2, d, bkv), dt), plgpu.SMEM((2, bkv), jnp.float32), mg.smem((bq, bkv), dt),
             plgpu.Barrier(num_barriers=4)] + [plgpu.Barrier(num_barriers=2)] * 4
  args = [jnp.asarray(t.kv_index), jnp.asarray(t.kv_count), q, k, kT, vT, do, lse, delta]
  if has_mask:
    args.append(_kv_bias(kv_mask))
  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), scratch_types=scratch,
                      grid=(nq, h, b), grid_names=("q", "h", "b"), kernel_name="block_sparse_bwd_dq",
                      interpret=_interpret(st))(*args)


def _dkv(st, q, k, v, kv_mask, do, lse, delta):
  b, h, length, d = q.shape
  t = st.tables
  bq, bkv, qw, nk = st.block_q, st.block_kv, t.q_width, t.num_kv_tiles
  hs = 1 if t.layout_heads > 1 else 0
  has_mask = kv_mask is not None
  lay = _layouts(st)
  qT, doT = jnp.swapaxes(q, 2, 3), jnp.swapaxes(do, 2, 3)

  def kernel(q_index_ref, q_count_ref, q_ref, qT_ref, k_ref, v_ref, do_ref, doT_ref, lse_ref, delta_ref, *rest):
    if has_mask:
      bias_ref, dk_ref, dv_ref, scratch = rest[0], rest[1], rest[2], rest[3:]
    else:
      bias_ref, (dk_ref, dv_ref), scratch = None, rest[:2], rest[2:]
    (k_smem, v_smem, bias_smem, q_smem, qT_smem, do_smem, doT_smem, lse_smem, delta_smem, p_smem, ds_smem,
     own_bar, q_bar, qT_bar, do_bar, doT_bar, lse_bar, delta_bar) = scratch
    j, hi, bi = lax.axis_index("kv"), lax.axis_index("h"), lax.axis_index("b")
    col = hi * hs * nk + j
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
      pT = jnp.exp(sT - lse)
      mg.stage(p_smem, pT)
      dv = dv + mg.mma(p_smem, do_smem.at[slot], (bkv, d))
      dpT = mg.mma(v_smem, doT_smem.at[slot], (bkv, bq))
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
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[bi, hi, keys])
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[bi, hi, keys])
    plgpu.wait_smem_to_gmem(0)

  dt = q.dtype
  scratch = [mg.smem((bkv, d), dt), mg.smem((bkv, d), dt), plgpu.SMEM((bkv,), jnp.float32),
             mg.smem((2, bq, d), dt), mg.smem((2, d, bq), dt), mg.smem((2, bq, d), dt), mg.smem((2, d, bq), dt),
             plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32), mg.smem((bkv, bq), dt),
             mg.smem((bkv, bq), dt), plgpu.Barrier(num_barriers=3)] + [plgpu.Barrier(num_barriers=2)] * 6
  args = [jnp.asarray(t.q_index), jnp.asarray(t.q_count), q, qT, k, v, do, doT, lse, delta]
  if has_mask:
    args.append(_kv_bias(kv_mask))
  return plgpu.kernel(kernel, out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                                        jax.ShapeDtypeStruct(v.shape, v.dtype)],
                      scratch_types=scratch, grid=(nk, h, b), grid_names=("kv", "h", "b"),
                      kernel_name="block_sparse_bwd_dkv", interpret=_interpret(st))(*args)


def backward(st, q, k, v, kv_mask, do, lse, delta):
  dq = _dq(st, q, k, v, kv_mask, do, lse, delta)
  dk, dv = _dkv(st, q, k, v, kv_mask, do, lse, delta)
  return dq, dk, dv


__all__ = ["backward", "forward"]
