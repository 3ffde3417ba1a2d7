"""Mosaic GPU (Hopper) kernel of chunked gated linear attention with a decay per head; the maths is in
`kernels.gated_linear.pallas` (the backward pass is three calls of this forward kernel).

One warpgroup per program over the grid `(value blocks, heads, batch)`: each program owns a 64-wide block of the value
dimension and walks the chunks of its (batch, head) in order, double-buffering the chunk tiles into shared memory by
TMA (`kernels.mosaic_gpu.stream`), the `[K, 64]` state carried in registers (float32, wgmma layout) with a copy rounded
to the input dtype in shared memory for the next chunk's matmul. Per chunk, with `b` the cumulative log-decay inside
the chunk (`[B, H, Lp]` float32, from the driver):
  o = ((q k^T) * exp(b_i - b_j) [j <= i]) v + exp(b_i) (q S)         (the decay applied to the rows of `q S`)
  S <- exp(b_C) S + k^T (v * exp(b_C - b))                            (the decay applied to the rows of v)
Every exponent is <= 0 (masked before `exp`). `b` travels into two shared-memory buffers, one read per row and one
per column of the `[C, C]` scores: jax 0.11's Mosaic GPU merges two loads of one buffer into one value that would need
both layouts (as in `kernels/linear_attention/pallas_gpu.py`). As in the other GPU kernels, wgmma operands are plain
shared-memory tiles (k^T is a transposed copy from XLA) so that the GPU interpreter runs the kernel on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_gpu as mg
from kernels.gated_linear.tables import GPU_VALUE_BLOCK, KernelParams


def _interpret(st: KernelParams):
  return mg.interpret_params() if st.interpret is True else (st.interpret or None)


def forward(st: KernelParams, q, k, v, cum_BxHxLp, *, name: str = "gated_linear_fwd"):
  """`[B, H, Lp, *]` q, k, v and the within-chunk cumulative log-decays `[B, H, Lp]` (float32) -> o `[B, H, Lp, V]`."""
  b, h, length, dk = q.shape
  dv, c, dt, w = v.shape[-1], st.chunk, q.dtype, GPU_VALUE_BLOCK
  n, lay = length // c, mg.Layouts(bool(st.interpret))

  def kernel(q_ref, kT_ref, v_ref, b_ref, o_ref, q_smem, kT_smem, v_smem, br_smem, bc_smem, s_smem, a_smem, vd_smem,
             o_smem, q_bar, kT_bar, v_bar, br_bar, bc_bar):
    db, hi, bi = lax.axis_index("d"), lax.axis_index("h"), lax.axis_index("b")
    cols = pl.ds(db * w, w)

    def fetch(step, slot):
      rows = pl.ds(step * c, c)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, rows], q_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(kT_ref.at[bi, hi, :, rows], kT_smem.at[slot], kT_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, rows, cols], v_smem.at[slot], v_bar.at[slot])
      plgpu.copy_gmem_to_smem(b_ref.at[bi, hi, rows], br_smem.at[slot], br_bar.at[slot])
      plgpu.copy_gmem_to_smem(b_ref.at[bi, hi, rows], bc_smem.at[slot], bc_bar.at[slot])

    mg.stage(s_smem, mg.full((dk, w), 0.0, lay.WGMMA))

    def body(step, slot, s_state):
      b_rows = mg.load(br_smem.at[slot], lay.ROW)  # [C]: b_i, broadcast along the rows' dimension 0
      b_cols = mg.load(bc_smem.at[slot], lay.COL)  # [C]: b_j, broadcast along dimension 1
      total = bc_smem.at[slot][c - 1]  # b_C, the chunk's whole log-decay (a scalar)
      rows_i = plgpu.broadcasted_iota(jnp.int32, (c, c), 0, layout=lay.WGMMA)
      cols_j = plgpu.broadcasted_iota(jnp.int32, (c, c), 1, layout=lay.WGMMA)
      causal = cols_j <= rows_i
      diff = lax.broadcast_in_dim(b_rows, (c, c), [0]) - lax.broadcast_in_dim(b_cols, (c, c), [1])
      scores = mg.mma(q_smem.at[slot], kT_smem.at[slot], (c, c))
      mg.stage(a_smem, jnp.where(causal, scores * jnp.exp(jnp.where(causal, diff, 0.0)), 0.0))
      inter = mg.mma(q_smem.at[slot], s_smem, (c, w))  # q S of the earlier chunks, before this chunk's decays
      out = mg.mma(a_smem, v_smem.at[slot], (c, w)) + lax.broadcast_in_dim(jnp.exp(b_rows), (c, w), [0]) * inter
      v_f32 = mg.load(v_smem.at[slot], lay.WGMMA).astype(jnp.float32)
      mg.stage(vd_smem, v_f32 * lax.broadcast_in_dim(jnp.exp(total - b_rows), (c, w), [0]))
      s_state = jnp.exp(total) * s_state + mg.mma(kT_smem.at[slot], vd_smem, (dk, w))
      mg.stage(s_smem, s_state)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_smem's previous store has been read
      mg.stage(o_smem, out)
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, hi, pl.ds(step * c, c), cols])
      return s_state

    mg.stream(n, fetch, body, mg.full((dk, w), 0.0, lay.WGMMA), (q_bar, kT_bar, v_bar, br_bar, bc_bar))
    plgpu.wait_smem_to_gmem(0)

  scratch = [mg.smem((2, c, dk), dt), mg.smem((2, dk, c), dt), mg.smem((2, c, w), dt),
             plgpu.SMEM((2, c), jnp.float32), plgpu.SMEM((2, c), jnp.float32), mg.smem((dk, w), dt),
             mg.smem((c, c), dt), mg.smem((c, w), dt), mg.smem((c, w), dt)]
  scratch += [plgpu.Barrier(num_barriers=2)] * 5
  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((b, h, length, dv), v.dtype), scratch_types=scratch,
                      grid=(dv // w, h, b), grid_names=("d", "h", "b"), kernel_name=name,
                      interpret=_interpret(st))(q, jnp.swapaxes(k, 2, 3), v, cum_BxHxLp.astype(jnp.float32))


__all__ = ["forward"]
