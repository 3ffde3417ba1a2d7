"""Mosaic GPU (Hopper) kernels of chunked linear attention; the maths is in `kernels.linear_attention.pallas`.

One warpgroup per program. The causal kernels walk the chunks of one (batch, head) in order (the dK and dV kernels in
reverse), double-buffering the chunk tiles into shared memory by TMA (`kernels.mosaic_gpu.stream`), with the carried
state in registers (float32, wgmma layout) and a copy rounded to the input dtype in shared memory for the next
chunk's matmul. To have more programs than batch x heads, each causal kernel owns a 64-wide block of the dimension
its state and output do not reduce over: the forward and dV kernels a block of the value dimension, the dQ and dK
kernels a block of the feature dimension (dQ and dK need the full value dimension, dV the full feature dimension,
hence separate dK and dV kernels). Non-causal: a state kernel per 64-wide value block reduces the states over the
chunks, then a kernel per chunk applies them. As in the block-sparse GPU kernels, wgmma operands are plain shared-memory
tiles (transposed copies come from XLA) so that the GPU interpreter can run the kernels on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_gpu as mg
from kernels.linear_attention.tables import KernelParams

_BLOCK = 64  # width of the state/output block one program owns


def _interpret(st):
  return mg.interpret_params() if st.interpret is True else (st.interpret or None)


def _t(x):  # [B, H, L, X] -> [B, H, X, L]
  return jnp.swapaxes(x, 2, 3)


def _tri(x, lay, *, lower: bool):
  rows = plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=lay.WGMMA)
  cols = plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=lay.WGMMA)
  return jnp.where(cols <= rows if lower else cols >= rows, x, 0.0)


def _emit(out_smem, value, dst) -> None:
  """Stores a per-chunk result through `out_smem` (reused: waits for its previous store to have been read)."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  mg.stage(out_smem, value)
  plgpu.copy_smem_to_gmem(out_smem, dst)


def _call(st, kernel, out_type, scratch, grid, names, name, *args):
  return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=names,
                      kernel_name=name, interpret=_interpret(st))(*args)


# ----------------------------------------------------------------------------------------------------------------------
# Causal.


def _causal_forward(st, q, k, v):
  b, h, length, f = q.shape
  d, c, dt = v.shape[-1], st.chunk, q.dtype
  n, lay, norm = length // c, mg.Layouts(bool(st.interpret)), st.normalize
  w = _BLOCK

  def kernel(q_ref, kT_ref, k_ref, v_ref, o_ref, r_ref, q_smem, kT_smem, k_smem, v_smem, s_smem, a_smem, o_smem,
             r_smem, q_bar, kT_bar, k_bar, v_bar):
    db, hi, bi = lax.axis_index("d"), lax.axis_index("h"), lax.axis_index("b")
    cols = pl.ds(db * w, w)

    def fetch(step, slot):
      rows = pl.ds(step * c, c)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, rows], q_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(kT_ref.at[bi, hi, :, rows], kT_smem.at[slot], kT_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, rows, cols], v_smem.at[slot], v_bar.at[slot])
      if norm:
        plgpu.copy_gmem_to_smem(k_ref.at[bi, hi, rows], k_smem.at[slot], k_bar.at[slot])

    mg.stage(s_smem, mg.full((f, w), 0.0, lay.WGMMA))

    def body(step, slot, carry):
      s_state, z = carry
      rows = pl.ds(step * c, c)
      if norm:
        q_f32 = mg.load(q_smem.at[slot], lay.WGMMA).astype(jnp.float32)
        k_f32 = mg.load(k_smem.at[slot], lay.WGMMA).astype(jnp.float32)
      a = _tri(mg.mma(q_smem.at[slot], kT_smem.at[slot], (c, c)), lay, lower=True)
      mg.stage(a_smem, a)
      num = mg.mma(a_smem, v_smem.at[slot], (c, w)) + mg.mma(q_smem.at[slot], s_smem, (c, w))
      s_state = s_state + mg.mma(kT_smem.at[slot], v_smem.at[slot], (f, w))
      mg.stage(s_smem, s_state)
      if norm:
        r = a.sum(axis=1) + (q_f32 * lax.broadcast_in_dim(z, (c, f), [1])).sum(axis=1) + st.eps
        num = num / lax.broadcast_in_dim(r, num.shape, [0])
        z = z + k_f32.sum(axis=0)

        @pl.when(db == 0)
        def _():
          _emit(r_smem, r, r_ref.at[bi, hi, rows])

      _emit(o_smem, num, o_ref.at[bi, hi, rows, cols])
      return s_state, z

    barriers = (q_bar, kT_bar, v_bar, k_bar) if norm else (q_bar, kT_bar, v_bar)
    mg.stream(n, fetch, body, (mg.full((f, w), 0.0, lay.WGMMA), mg.full((f,), 0.0, lay.COL)), barriers)
    plgpu.wait_smem_to_gmem(0)

  scratch = [mg.smem((2, c, f), dt), mg.smem((2, f, c), dt), mg.smem((2, c, f), dt), mg.smem((2, c, w), dt),
             mg.smem((f, w), dt), mg.smem((c, c), dt), mg.smem((c, w), dt), plgpu.SMEM((c,), jnp.float32)]
  scratch += [plgpu.Barrier(num_barriers=2)] * 4
  out_type = [jax.ShapeDtypeStruct((b, h, length, d), v.dtype), jax.ShapeDtypeStruct((b, h, length), jnp.float32)]
  o, r = _call(st, kernel, out_type, scratch, (d // w, h, b), ("d", "h", "b"), "linear_attention_fwd",
               q, _t(k), k, v)
  return o, (r if norm else None), ()


def _unread(gd, like):
  """A placeholder for the absent gd (normalize=False): the kernels take it but never read it."""
  b, h, length, _ = like.shape
  return jnp.zeros((b, h, length), jnp.float32) if gd is None else gd


def _causal_dq(st, k, v, gn, gd):
  gd = _unread(gd, k)
  b, h, length, f = k.shape
  d, c, dt = v.shape[-1], st.chunk, k.dtype
  n, lay, norm, w = length // c, mg.Layouts(bool(st.interpret)), st.normalize, _BLOCK

  def kernel(gn_ref, vT_ref, k_ref, gd_ref, dq_ref, gn_smem, vT_smem, k_smem, gd_smem, st_smem, da_smem, dq_smem,
             gn_bar, vT_bar, k_bar, gd_bar):
    fb, hi, bi = lax.axis_index("f"), lax.axis_index("h"), lax.axis_index("b")
    feats = pl.ds(fb * w, w)

    def fetch(step, slot):
      rows = pl.ds(step * c, c)
      plgpu.copy_gmem_to_smem(gn_ref.at[bi, hi, rows], gn_smem.at[slot], gn_bar.at[slot])
      plgpu.copy_gmem_to_smem(vT_ref.at[bi, hi, :, rows], vT_smem.at[slot], vT_bar.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[bi, hi, rows, feats], k_smem.at[slot], k_bar.at[slot])
      if norm:
        plgpu.copy_gmem_to_smem(gd_ref.at[bi, hi, rows], gd_smem.at[slot], gd_bar.at[slot])

    mg.stage(st_smem, mg.full((d, w), 0.0, lay.WGMMA))

    def body(step, slot, carry):
      st_state, z = carry  # S^T[:, block] = sum v^T k[:, block];  z[block] = sum k[:, block]
      da = mg.mma(gn_smem.at[slot], vT_smem.at[slot], (c, c))
      if norm:
        gd = mg.load(gd_smem.at[slot], lay.ROW)
        k_f32 = mg.load(k_smem.at[slot], lay.WGMMA).astype(jnp.float32)
        da = da + lax.broadcast_in_dim(gd, (c, c), [0])
      mg.stage(da_smem, _tri(da, lay, lower=True))
      dq = mg.mma(da_smem, k_smem.at[slot], (c, w)) + mg.mma(gn_smem.at[slot], st_smem, (c, w))
      st_state = st_state + mg.mma(vT_smem.at[slot], k_smem.at[slot], (d, w))
      mg.stage(st_smem, st_state)
      if norm:
        dq = dq + lax.broadcast_in_dim(gd, (c, w), [0]) * lax.broadcast_in_dim(z, (c, w), [1])
        z = z + k_f32.sum(axis=0)
      _emit(dq_smem, dq, dq_ref.at[bi, hi, pl.ds(step * c, c), feats])
      return st_state, z

    barriers = (gn_bar, vT_bar, k_bar, gd_bar) if norm else (gn_bar, vT_bar, k_bar)
    mg.stream(n, fetch, body, (mg.full((d, w), 0.0, lay.WGMMA), mg.full((w,), 0.0, lay.COL)), barriers)
    plgpu.wait_smem_to_gmem(0)

  scratch = [mg.smem((2, c, d), dt), mg.smem((2, d, c), dt), mg.smem((2, c, w), dt), plgpu.SMEM((2, c), jnp.float32),
             mg.smem((d, w), dt), mg.smem((c, c), dt), mg.smem((c, w), dt)] + [plgpu.Barrier(num_barriers=2)] * 4
  return _call(st, kernel, jax.ShapeDtypeStruct(k.shape, k.dtype), scratch, (f // w, h, b), ("f", "h", "b"),
               "linear_attention_bwd_dq", gn, _t(v), k, gd)


def _causal_dk(st, q, v, gn, gd):
  gd = _unread(gd, q)
  b, h, length, f = q.shape
  d, c, dt = v.shape[-1], st.chunk, q.dtype
  n, lay, norm, w = length // c, mg.Layouts(bool(st.interpret)), st.normalize, _BLOCK

  def kernel(v_ref, gnT_ref, q_ref, gd_ref, dk_ref, v_smem, gnT_smem, q_smem, gd_smem, gdc_smem, pt_smem, dat_smem,
             dk_smem, v_bar, gnT_bar, q_bar, gd_bar, gdc_bar):
    fb, hi, bi = lax.axis_index("f"), lax.axis_index("h"), lax.axis_index("b")
    feats = pl.ds(fb * w, w)

    def fetch(step, slot):
      rows = pl.ds((n - 1 - step) * c, c)
      plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, rows], v_smem.at[slot], v_bar.at[slot])
      plgpu.copy_gmem_to_smem(gnT_ref.at[bi, hi, :, rows], gnT_smem.at[slot], gnT_bar.at[slot])
      plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, rows, feats], q_smem.at[slot], q_bar.at[slot])
      if norm:
        plgpu.copy_gmem_to_smem(gd_ref.at[bi, hi, rows], gd_smem.at[slot], gd_bar.at[slot])
        plgpu.copy_gmem_to_smem(gd_ref.at[bi, hi, rows], gdc_smem.at[slot], gdc_bar.at[slot])

    mg.stage(pt_smem, mg.full((d, w), 0.0, lay.WGMMA))

    def body(step, slot, carry):
      pt_state, y = carry  # P^T[:, block] = sum gn^T q[:, block] and y[block] = sum gd q[:, block], later chunks
      dat = mg.mma(v_smem.at[slot], gnT_smem.at[slot], (c, c))  # dA^T [s, t]
      if norm:
        q_f32 = mg.load(q_smem.at[slot], lay.WGMMA).astype(jnp.float32)
        # gd is needed per column (dA^T) and per row (y): two copies of it, one per layout. Loaded from one buffer,
        # jax 0.11's Mosaic GPU merges the two loads into one value that would need both layouts, and its layout
        # inference then finds no solution (jax 0.10 lowered it).
        dat = dat + lax.broadcast_in_dim(mg.load(gdc_smem.at[slot], lay.COL), (c, c), [1])
        gd_rows = mg.load(gd_smem.at[slot], lay.ROW)
      mg.stage(dat_smem, _tri(dat, lay, lower=False))
      dk = mg.mma(dat_smem, q_smem.at[slot], (c, w)) + mg.mma(v_smem.at[slot], pt_smem, (c, w))
      pt_state = pt_state + mg.mma(gnT_smem.at[slot], q_smem.at[slot], (d, w))
      mg.stage(pt_smem, pt_state)
      if norm:
        dk = dk + lax.broadcast_in_dim(y, (c, w), [1])
        y = y + (q_f32 * lax.broadcast_in_dim(gd_rows, (c, w), [0])).sum(axis=0)
      _emit(dk_smem, dk, dk_ref.at[bi, hi, pl.ds((n - 1 - step) * c, c), feats])
      return pt_state, y

    barriers = (v_bar, gnT_bar, q_bar, gd_bar, gdc_bar) if norm else (v_bar, gnT_bar, q_bar)
    mg.stream(n, fetch, body, (mg.full((d, w), 0.0, lay.WGMMA), mg.full((w,), 0.0, lay.COL)), barriers)
    plgpu.wait_smem_to_gmem(0)

  scratch = [mg.smem((2, c, d), dt), mg.smem((2, d, c), dt), mg.smem((2, c, w), dt), plgpu.SMEM((2, c), jnp.float32),
             plgpu.SMEM((2, c), jnp.float32), mg.smem((d, w), dt), mg.smem((c, c), dt), mg.smem((c, w), dt)]
  scratch += [plgpu.Barrier(num_barriers=2)] * 5
  return _call(st, kernel, jax.ShapeDtypeStruct(q.shape, q.dtype), scratch, (f // w, h, b), ("f", "h", "b"),
               "linear_attention_bwd_dk", v, _t(gn), q, gd)


def _causal_dv(st, q, k, gn):
  b, h, length, f = q.shape
  d, c, dt = gn.shape[-1], st.chunk, q.dtype
  n, lay, w = length // c, mg.Layouts(bool(st.interpret)), _BLOCK

  def kernel(k_ref, qT_ref, gn_ref, dv_ref, k_smem, qT_smem, gn_smem, p_smem, at_smem, dv_smem, k_bar, qT_bar,
             gn_bar):
    db, hi, bi = lax.axis_index("d"), lax.axis_index("h"), lax.axis_index("b")
    cols = pl.ds(db * w, w)

    def fetch(step, slot):
      rows = pl.ds((n - 1 - step) * c, c)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, hi, rows], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(qT_ref.at[bi, hi, :, rows], qT_smem.at[slot], qT_bar.at[slot])
      plgpu.copy_gmem_to_smem(gn_ref.at[bi, hi, rows, cols], gn_smem.at[slot], gn_bar.at[slot])

    mg.stage(p_smem, mg.full((f, w), 0.0, lay.WGMMA))

    def body(step, slot, p_state):  # P[:, block] = sum q^T gn[:, block] over the later chunks
      at = _tri(mg.mma(k_smem.at[slot], qT_smem.at[slot], (c, c)), lay, lower=False)  # A^T [s, t]
      mg.stage(at_smem, at)
      dv = mg.mma(at_smem, gn_smem.at[slot], (c, w)) + mg.mma(k_smem.at[slot], p_smem, (c, w))
      p_state = p_state + mg.mma(qT_smem.at[slot], gn_smem.at[slot], (f, w))
      mg.stage(p_smem, p_state)
      _emit(dv_smem, dv, dv_ref.at[bi, hi, pl.ds((n - 1 - step) * c, c), cols])
      return p_state

    mg.stream(n, fetch, body, mg.full((f, w), 0.0, lay.WGMMA), (k_bar, qT_bar, gn_bar))
    plgpu.wait_smem_to_gmem(0)

  scratch = [mg.smem((2, c, f), dt), mg.smem((2, f, c), dt), mg.smem((2, c, w), dt), mg.smem((f, w), dt),
             mg.smem((c, c), dt), mg.smem((c, w), dt)] + [plgpu.Barrier(num_barriers=2)] * 3
  return _call(st, kernel, jax.ShapeDtypeStruct(gn.shape, gn.dtype), scratch, (d // w, h, b), ("d", "h", "b"),
               "linear_attention_bwd_dv", k, _t(q), gn)


# ----------------------------------------------------------------------------------------------------------------------
# Non-causal.


def _state(st, x, y, wts, name):
  """`x^T y` ([B, H, F, Dy] float32) and, with normalize, the column sums of x weighted by `wts` ([B, H, L] or None
  for ones) as [B, H, F]."""
  b, h, length, f = x.shape
  dy, c, dt = y.shape[-1], st.chunk, x.dtype
  n, lay, norm, w = length // c, mg.Layouts(bool(st.interpret)), st.normalize, _BLOCK
  weighted = wts is not None

  def kernel(xT_ref, y_ref, x_ref, w_ref, s_ref, z_ref, xT_smem, y_smem, x_smem, w_smem, s_smem, z_smem, xT_bar,
             y_bar, x_bar, w_bar):
    db, hi, bi = lax.axis_index("d"), lax.axis_index("h"), lax.axis_index("b")
    cols = pl.ds(db * w, w)

    def fetch(step, slot):
      rows = pl.ds(step * c, c)
      plgpu.copy_gmem_to_smem(xT_ref.at[bi, hi, :, rows], xT_smem.at[slot], xT_bar.at[slot])
      plgpu.copy_gmem_to_smem(y_ref.at[bi, hi, rows, cols], y_smem.at[slot], y_bar.at[slot])
      if norm:
        plgpu.copy_gmem_to_smem(x_ref.at[bi, hi, rows], x_smem.at[slot], x_bar.at[slot])
      if weighted:
        plgpu.copy_gmem_to_smem(w_ref.at[bi, hi, rows], w_smem.at[slot], w_bar.at[slot])

    def body(step, slot, carry):
      s_state, z = carry
      if norm:
        x_f32 = mg.load(x_smem.at[slot], lay.WGMMA).astype(jnp.float32)
        if weighted:
          x_f32 = x_f32 * lax.broadcast_in_dim(mg.load(w_smem.at[slot], lay.ROW), (c, f), [0])
        z = z + x_f32.sum(axis=0)
      s_state = s_state + mg.mma(xT_smem.at[slot], y_smem.at[slot], (f, w))
      return s_state, z

    barriers = [xT_bar, y_bar] + ([x_bar] if norm else []) + ([w_bar] if weighted else [])
    s_state, z = mg.stream(n, fetch, body, (mg.full((f, w), 0.0, lay.WGMMA), mg.full((f,), 0.0, lay.COL)), barriers)
    mg.stage(s_smem, s_state)
    plgpu.copy_smem_to_gmem(s_smem, s_ref.at[bi, hi, :, cols])
    if norm:
      mg.stage(z_smem, z)

      @pl.when(db == 0)
      def _():
        plgpu.copy_smem_to_gmem(z_smem, z_ref.at[bi, hi])

    plgpu.wait_smem_to_gmem(0)

  scratch = [mg.smem((2, f, c), dt), mg.smem((2, c, w), dt), mg.smem((2, c, f), dt), plgpu.SMEM((2, c), jnp.float32),
             plgpu.SMEM((f, w), jnp.float32), plgpu.SMEM((f,), jnp.float32)] + [plgpu.Barrier(num_barriers=2)] * 4
  out_type = [jax.ShapeDtypeStruct((b, h, f, dy), jnp.float32), jax.ShapeDtypeStruct((b, h, f), jnp.float32)]
  return _call(st, kernel, out_type, scratch, (dy // w, h, b), ("d", "h", "b"), name, _t(x), y, x, _unread(wts, x))


def _noncausal_forward(st, q, k, v):
  b, h, length, f = q.shape
  d, c, dt = v.shape[-1], st.chunk, q.dtype
  lay, norm = mg.Layouts(bool(st.interpret)), st.normalize
  s_state, z = _state(st, k, v, None, "linear_attention_fwd_state")

  def kernel(q_ref, s_ref, z_ref, o_ref, r_ref, q_smem, s_smem, z_smem, o_smem, r_smem, bar):
    ci, hi, bi = lax.axis_index("c"), lax.axis_index("h"), lax.axis_index("b")
    rows = pl.ds(ci * c, c)
    plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, rows], q_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(s_ref.at[bi, hi], s_smem, bar.at[1])
    plgpu.copy_gmem_to_smem(z_ref.at[bi, hi], z_smem, bar.at[2])
    for i in range(3):
      plgpu.barrier_wait(bar.at[i])
    num = mg.mma(q_smem, s_smem, (c, d))
    if norm:
      q_f32 = mg.load(q_smem, lay.WGMMA).astype(jnp.float32)
      r = (q_f32 * lax.broadcast_in_dim(mg.load(z_smem, lay.COL), (c, f), [1])).sum(axis=1) + st.eps
      num = num / lax.broadcast_in_dim(r, num.shape, [0])
      mg.stage(r_smem, r)
      plgpu.copy_smem_to_gmem(r_smem, r_ref.at[bi, hi, rows])
    mg.stage(o_smem, num)
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, hi, rows])
    plgpu.wait_smem_to_gmem(0)

  scratch = [mg.smem((c, f), dt), mg.smem((f, d), dt), plgpu.SMEM((f,), jnp.float32), mg.smem((c, d), dt),
             plgpu.SMEM((c,), jnp.float32), plgpu.Barrier(num_barriers=3)]
  out_type = [jax.ShapeDtypeStruct((b, h, length, d), v.dtype), jax.ShapeDtypeStruct((b, h, length), jnp.float32)]
  o, r = _call(st, kernel, out_type, scratch, (length // c, h, b), ("c", "h", "b"), "linear_attention_fwd",
               q, s_state.astype(dt), z)
  return o, (r if norm else None), (s_state, z)


def _noncausal_backward(st, q, k, v, gn, gd, states):
  b, h, length, f = q.shape
  d, c, dt = v.shape[-1], st.chunk, q.dtype
  lay, norm = mg.Layouts(bool(st.interpret)), st.normalize
  s_state, z = states
  p_state, y = _state(st, q, gn, gd, "linear_attention_bwd_state")
  gd = _unread(gd, q)

  def kernel(gn_ref, v_ref, k_ref, gd_ref, sT_ref, pT_ref, p_ref, z_ref, y_ref, dq_ref, dk_ref, dv_ref, gn_smem,
             v_smem, k_smem, gd_smem, sT_smem, pT_smem, p_smem, z_smem, y_smem, dq_smem, dk_smem, dv_smem, bar):
    ci, hi, bi = lax.axis_index("c"), lax.axis_index("h"), lax.axis_index("b")
    rows = pl.ds(ci * c, c)
    copies = [(gn_ref.at[bi, hi, rows], gn_smem), (v_ref.at[bi, hi, rows], v_smem), (k_ref.at[bi, hi, rows], k_smem),
              (sT_ref.at[bi, hi], sT_smem), (pT_ref.at[bi, hi], pT_smem), (p_ref.at[bi, hi], p_smem)]
    if norm:
      copies += [(gd_ref.at[bi, hi, rows], gd_smem), (z_ref.at[bi, hi], z_smem), (y_ref.at[bi, hi], y_smem)]
    for i, (src, dst) in enumerate(copies):
      plgpu.copy_gmem_to_smem(src, dst, bar.at[i])
    for i in range(len(copies)):
      plgpu.barrier_wait(bar.at[i])
    dq = mg.mma(gn_smem, sT_smem, (c, f))
    dk = mg.mma(v_smem, pT_smem, (c, f))
    if norm:
      gd_rows = lax.broadcast_in_dim(mg.load(gd_smem, lay.ROW), (c, f), [0])
      dq = dq + gd_rows * lax.broadcast_in_dim(mg.load(z_smem, lay.COL), (c, f), [1])
      dk = dk + lax.broadcast_in_dim(mg.load(y_smem, lay.COL), (c, f), [1])
    mg.stage(dq_smem, dq)
    mg.stage(dk_smem, dk)
    mg.stage(dv_smem, mg.mma(k_smem, p_smem, (c, d)))
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bi, hi, rows])
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[bi, hi, rows])
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[bi, hi, rows])
    plgpu.wait_smem_to_gmem(0)

  scratch = [mg.smem((c, d), dt), mg.smem((c, d), dt), mg.smem((c, f), dt), plgpu.SMEM((c,), jnp.float32),
             mg.smem((d, f), dt), mg.smem((d, f), dt), mg.smem((f, d), dt), plgpu.SMEM((f,), jnp.float32),
             plgpu.SMEM((f,), jnp.float32), mg.smem((c, f), dt), mg.smem((c, f), dt), mg.smem((c, d), dt),
             plgpu.Barrier(num_barriers=9)]
  out_type = [jax.ShapeDtypeStruct(q.shape, dt), jax.ShapeDtypeStruct(k.shape, dt), jax.ShapeDtypeStruct(v.shape, dt)]
  return _call(st, kernel, out_type, scratch, (length // c, h, b), ("c", "h", "b"), "linear_attention_bwd",
               gn, v, k, gd, _t(s_state).astype(dt), _t(p_state).astype(dt), p_state.astype(dt), z, y)


# ----------------------------------------------------------------------------------------------------------------------
# Entry points used by `kernels.linear_attention.pallas`.


def forward(st: KernelParams, q, k, v):
  """[B, H, Lp, *] -> (o, r = den + eps [B, H, Lp] or None, states for the backward pass)."""
  if st.causal:
    return _causal_forward(st, q, k, v)
  return _noncausal_forward(st, q, k, v)


def backward(st: KernelParams, q, k, v, gn, gd, states):
  if st.causal:
    return _causal_dq(st, k, v, gn, gd), _causal_dk(st, q, v, gn, gd), _causal_dv(st, q, k, gn)
  return tuple(_noncausal_backward(st, q, k, v, gn, gd, states))


__all__ = ["backward", "forward"]
