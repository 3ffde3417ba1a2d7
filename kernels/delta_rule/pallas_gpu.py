"""Mosaic GPU (Hopper) kernels of the delta rule's sequential part, forward and backward; the maths and the chunk
transforms (computed in XLA) are in `kernels.delta_rule.pallas`, the per-chunk steps in `pallas_tpu.py`'s docstring.

One warpgroup per program over the grid `(value blocks, heads, batch)`. The delta rule acts on every value column
alike (`E = U - W S`, `S <- dc S + Kd^T E` column by column), so each program owns a 64-wide block of the value
dimension and walks the chunks of its (batch, head) in order (the backward pass in reverse), the `[K, 64]` float32
carry (forward the state, from the initial to the final one; backward its cotangent) in registers (wgmma layout) with
a copy rounded to the input dtype in shared memory for the next chunk's matmuls. The forward pass double-buffers the
chunk tiles by TMA (`kernels.mosaic_gpu.stream`) and, when differentiated, writes the state entering each chunk (input
dtype, `[N, K, V]` per row). The backward pass reads its eight tiles single-buffered (double-buffered they would not
fit in shared memory at K = 128); the cotangents that sum over the value dimension (`dQg = dO S^T`, `dM = dO E^T`,
`dW = -dE S^T`, `dKd = E dS^T`, `d dc`) are written per value block (float32) and summed in XLA.
`E^T = U^T - S^T W^T` and `dKd^T = dS E^T` are computed transposed, and the chunk's decay `dc` travels as a `[64]`
vector (one value repeated) broadcast along the state's columns. As in the other GPU kernels, wgmma operands are
plain shared-memory tiles (transposed copies come from XLA) so that the GPU interpreter runs the kernels on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_gpu as mg
from kernels.delta_rule.tables import GPU_VALUE_BLOCK, KernelParams

_F32 = jnp.float32


def _interpret(st: KernelParams):
  return mg.interpret_params() if st.interpret is True else (st.interpret or None)


def _t(x):  # [..., L, X] -> [..., X, L]
  return jnp.swapaxes(x, -1, -2)


def _emit(out_smem, value, dst) -> None:
  """Stores a per-chunk result through `out_smem` (reused: waits for its previous store to have been read)."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  mg.stage(out_smem, value)
  plgpu.copy_smem_to_gmem(out_smem, dst)


def _call(st, kernel, out_type, scratch, grid, name, *args):
  return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("d", "h", "b"),
                      kernel_name=name, interpret=_interpret(st))(*args)


def _smem_f32(shape: tuple[int, int]) -> plgpu.SMEM:
  """A float32 tile the kernel loads into registers in the wgmma layout: tiled and swizzled (jax 0.10's Mosaic GPU
  finds no bank-conflict-free transfer plan for that load from a plain buffer)."""
  return plgpu.SMEM(shape, _F32, transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))


def _decay_vectors(dc_BxHxN: jax.Array, dv: int) -> jax.Array:
  """The chunks' decays as `[B, H, N, V]` float32 rows (one value repeated): a per-column vector in the kernel."""
  return jnp.broadcast_to(dc_BxHxN.astype(_F32)[..., None], (*dc_BxHxN.shape, dv))


def forward(st: KernelParams, qg, m, u, w, kd, dc, s0, *, save_states: bool):
  """`[B, H, Lp, *]` qg, m, u, w, kd (input dtype), the chunks' decays `[B, H, N]` and the initial state `[B, H, K,
  V]` -> (o `[B, H, Lp, V]`, the states entering each chunk `[B, H, N, K, V]` in the input dtype when `save_states`
  else None, the final state `[B, H, K, V]` float32)."""
  bsz, h, length, dk = qg.shape
  dv, c, dt, wd = u.shape[-1], st.chunk, qg.dtype, GPU_VALUE_BLOCK
  n, lay = length // c, mg.Layouts(bool(st.interpret))

  def kernel(qg_ref, m_ref, u_ref, w_ref, kdT_ref, dc_ref, s0_ref, o_ref, *rest):
    states_ref = rest[0] if save_states else None
    (sf_ref, qg_smem, m_smem, u_smem, w_smem, kdT_smem, dc_smem, s_smem, e_smem, o_smem, sf_smem,
     qg_bar, m_bar, u_bar, w_bar, kdT_bar, dc_bar, s0_bar) = rest[1:] if save_states else rest
    db, hi, bi = lax.axis_index("d"), lax.axis_index("h"), lax.axis_index("b")
    cols = pl.ds(db * wd, wd)

    def fetch(step, slot):
      rows = pl.ds(step * c, c)
      plgpu.copy_gmem_to_smem(qg_ref.at[bi, hi, rows], qg_smem.at[slot], qg_bar.at[slot])
      plgpu.copy_gmem_to_smem(m_ref.at[bi, hi, rows], m_smem.at[slot], m_bar.at[slot])
      plgpu.copy_gmem_to_smem(u_ref.at[bi, hi, rows, cols], u_smem.at[slot], u_bar.at[slot])
      plgpu.copy_gmem_to_smem(w_ref.at[bi, hi, rows], w_smem.at[slot], w_bar.at[slot])
      plgpu.copy_gmem_to_smem(kdT_ref.at[bi, hi, :, rows], kdT_smem.at[slot], kdT_bar.at[slot])
      plgpu.copy_gmem_to_smem(dc_ref.at[bi, hi, step, cols], dc_smem.at[slot], dc_bar.at[slot])

    plgpu.copy_gmem_to_smem(s0_ref.at[bi, hi, :, cols], sf_smem, s0_bar.at[0])
    plgpu.barrier_wait(s0_bar.at[0])
    s_init = mg.load(sf_smem, lay.WGMMA)
    mg.stage(s_smem, s_init)

    def body(step, slot, s_state):
      if save_states:  # the state entering this chunk, as the matmuls below read it
        plgpu.copy_smem_to_gmem(s_smem, states_ref.at[bi, hi, step, :, cols])
      e = mg.load(u_smem.at[slot], lay.WGMMA).astype(_F32) - mg.mma(w_smem.at[slot], s_smem, (c, wd))
      mg.stage(e_smem, e)
      o = mg.mma(qg_smem.at[slot], s_smem, (c, wd)) + mg.mma(m_smem.at[slot], e_smem, (c, wd))
      decay = lax.broadcast_in_dim(mg.load(dc_smem.at[slot], lay.COL), (dk, wd), [1])
      s_state = decay * s_state + mg.mma(kdT_smem.at[slot], e_smem, (dk, wd))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the state's copy out has read s_smem
      mg.stage(s_smem, s_state)
      _emit(o_smem, o, o_ref.at[bi, hi, pl.ds(step * c, c), cols])
      return s_state

    barriers = (qg_bar, m_bar, u_bar, w_bar, kdT_bar, dc_bar)
    s_final = mg.stream(n, fetch, body, s_init, barriers)
    mg.stage(sf_smem, s_final)
    plgpu.copy_smem_to_gmem(sf_smem, sf_ref.at[bi, hi, :, cols])
    plgpu.wait_smem_to_gmem(0)

  scratch = [mg.smem((2, c, dk), dt), mg.smem((2, c, c), dt), mg.smem((2, c, wd), dt), mg.smem((2, c, dk), dt),
             mg.smem((2, dk, c), dt), plgpu.SMEM((2, wd), _F32), mg.smem((dk, wd), dt), mg.smem((c, wd), dt),
             mg.smem((c, wd), dt), _smem_f32((dk, wd))] + [plgpu.Barrier(num_barriers=2)] * 6
  scratch.append(plgpu.Barrier(num_barriers=1))
  out_type = [jax.ShapeDtypeStruct((bsz, h, length, dv), dt)]
  if save_states:
    out_type.append(jax.ShapeDtypeStruct((bsz, h, n, dk, dv), dt))
  out_type.append(jax.ShapeDtypeStruct((bsz, h, dk, dv), _F32))
  outs = _call(st, kernel, out_type, scratch, (dv // wd, h, bsz), "delta_rule_fwd",
               qg, m, u, w, _t(kd), _decay_vectors(dc, dv), s0.astype(_F32))
  return tuple(outs) if save_states else (outs[0], None, outs[1])


def backward(st: KernelParams, qg, m, u, w, kd, dc, states, do, dsf):
  """The cotangents of `forward`'s inputs (float32; `d dc` `[B, H, N]`, `d s0` `[B, H, K, V]`), from the states it
  saved and the cotangents of its outputs `do`, `dsf` (the final state's)."""
  bsz, h, length, dk = qg.shape
  dv, c, dt, wd = u.shape[-1], st.chunk, qg.dtype, GPU_VALUE_BLOCK
  n, lay, nv = length // c, mg.Layouts(bool(st.interpret)), dv // GPU_VALUE_BLOCK
  mT = _t(m.reshape(bsz, h, n, c, c)).reshape(bsz, h, length, c)  # each chunk's [C, C] block transposed

  def kernel(qgT_ref, mT_ref, uT_ref, kd_ref, wT_ref, do_ref, sT_ref, dc_ref, dsf_ref,
             dqg_ref, dm_ref, du_ref, dw_ref, dkdT_ref, ddc_ref, ds0_ref,
             qgT_smem, mT_smem, uT_smem, kd_smem, wT_smem, do_smem, sT_smem, dc_smem, ds_smem, eT_smem, de_smem,
             ck_out, cc_out, cw_out, kc_out, w_out, bar):
    db, hi, bi = lax.axis_index("d"), lax.axis_index("h"), lax.axis_index("b")
    cols = pl.ds(db * wd, wd)
    # kc_out ([K, C] float32, C = 64 = the value block) carries the final state's cotangent in and d s0 out.
    plgpu.copy_gmem_to_smem(dsf_ref.at[bi, hi, :, cols], kc_out, bar.at[8])
    plgpu.barrier_wait(bar.at[8])
    ds_init = mg.load(kc_out, lay.WGMMA)
    mg.stage(ds_smem, ds_init)

    def body(step, ds_state):  # ds_state: the cotangent of the state leaving chunk `ci`
      ci = n - 1 - step
      rows = pl.ds(ci * c, c)
      plgpu.commit_smem()  # every warp is done with the previous chunk's tiles before they are overwritten
      copies = [(qgT_ref.at[bi, hi, :, rows], qgT_smem), (mT_ref.at[bi, hi, rows], mT_smem),
                (uT_ref.at[bi, hi, cols, rows], uT_smem), (kd_ref.at[bi, hi, rows], kd_smem),
                (wT_ref.at[bi, hi, :, rows], wT_smem), (do_ref.at[bi, hi, rows, cols], do_smem),
                (sT_ref.at[bi, hi, ci, cols], sT_smem), (dc_ref.at[bi, hi, ci, cols], dc_smem)]
      for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, bar.at[i])
      for i in range(len(copies)):
        plgpu.barrier_wait(bar.at[i])
      e_t = mg.load(uT_smem, lay.WGMMA).astype(_F32) - mg.mma(sT_smem, wT_smem, (wd, c))  # E^T [64, C]
      mg.stage(eT_smem, e_t)
      de = mg.mma(mT_smem, do_smem, (c, wd)) + mg.mma(kd_smem, ds_smem, (c, wd))  # dE [C, 64]
      mg.stage(de_smem, de)
      out = lambda ref: ref.at[db, bi, hi, rows]  # noqa: E731  a per-value-block partial
      _emit(ck_out, mg.mma(do_smem, sT_smem, (c, dk)), out(dqg_ref))
      _emit(cc_out, mg.mma(do_smem, eT_smem, (c, c)), out(dm_ref))
      _emit(kc_out, mg.mma(ds_smem, eT_smem, (dk, c)), dkdT_ref.at[db, bi, hi, :, rows])
      _emit(cw_out, de, du_ref.at[bi, hi, rows, cols])
      ck_next = mg.mma(de_smem, sT_smem, (c, dk))
      _emit(ck_out, -ck_next, out(dw_ref))
      diag = mg.mma(sT_smem, ds_smem, (wd, wd))  # (S^T dS)_jj: d dc's share of this block
      eye = (plgpu.broadcasted_iota(jnp.int32, (wd, wd), 0, layout=lay.WGMMA)
             == plgpu.broadcasted_iota(jnp.int32, (wd, wd), 1, layout=lay.WGMMA))
      _emit(w_out, jnp.where(eye, diag, 0.0).sum(axis=0), ddc_ref.at[bi, hi, ci, cols])
      decay = lax.broadcast_in_dim(mg.load(dc_smem, lay.COL), (dk, wd), [1])
      ds_state = (mg.mma(qgT_smem, do_smem, (dk, wd)) + decay * ds_state
                  - mg.mma(wT_smem, de_smem, (dk, wd)))
      mg.stage(ds_smem, ds_state)
      return ds_state

    ds_first = lax.fori_loop(0, n, body, ds_init)
    _emit(kc_out, ds_first, ds0_ref.at[bi, hi, :, cols])
    plgpu.wait_smem_to_gmem(0)

  scratch = [mg.smem((dk, c), dt), mg.smem((c, c), dt), mg.smem((wd, c), dt), mg.smem((c, dk), dt),
             mg.smem((dk, c), dt), mg.smem((c, wd), dt), mg.smem((wd, dk), dt), plgpu.SMEM((wd,), _F32),
             mg.smem((dk, wd), dt), mg.smem((wd, c), dt), mg.smem((c, wd), dt),
             plgpu.SMEM((c, dk), _F32), plgpu.SMEM((c, c), _F32), mg.smem((c, wd), dt), _smem_f32((dk, c)),
             plgpu.SMEM((wd,), _F32), plgpu.Barrier(num_barriers=9)]
  partial = lambda *shape: jax.ShapeDtypeStruct((nv, bsz, h, *shape), _F32)  # noqa: E731
  out_type = [partial(length, dk), partial(length, c), jax.ShapeDtypeStruct(u.shape, dt), partial(length, dk),
              partial(dk, length), jax.ShapeDtypeStruct((bsz, h, n, dv), _F32),
              jax.ShapeDtypeStruct((bsz, h, dk, dv), _F32)]
  dqg, dm, du, dw, dkdT, ddc, ds0 = _call(
      st, kernel, out_type, scratch, (nv, h, bsz), "delta_rule_bwd",
      _t(qg), mT, _t(u), kd, _t(w), do.astype(dt), _t(states), _decay_vectors(dc, dv), dsf.astype(_F32))
  return dqg.sum(0), dm.sum(0), du.astype(_F32), dw.sum(0), _t(dkdT.sum(0)), ddc.sum(-1), ds0


__all__ = ["backward", "forward"]
