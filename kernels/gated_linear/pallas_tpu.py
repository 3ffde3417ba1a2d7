"""TPU (Mosaic TPU) kernel of chunked gated linear attention with a decay per head; the maths is in
`kernels.gated_linear.pallas`.

`pl.pallas_call` over the grid `(batch, heads, chunks)`, the chunk axis "arbitrary": the `[K, V]` float32 state is
carried across chunks in VMEM scratch. Per chunk, with `b` the cumulative log-decay inside the chunk (lane-broadcast
`[C, 128]`, computed by the driver): `o = ((q k^T) * exp(b_i - b_j) [j <= i]) v + (q * exp(b)) S`, then
`S <- exp(b_C) S + (k * exp(b_C - b))^T v`. Every exponent is <= 0 (masked before `exp`). Matmul operands keep the
input dtype with float32 accumulation. `interpret=True` runs the same kernel on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.gated_linear.tables import LANES, KernelParams

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, o_ref, s_scr):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    s_scr[...] = jnp.zeros_like(s_scr)

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  b_lanes = b_ref[...]  # [C, 128], every lane the same
  b_col = b_lanes[:, :1]  # [C, 1]
  b_row = jnp.transpose(b_lanes)[:1, :]  # [1, C]
  c = b_lanes.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  causal = cols <= rows
  decay = jnp.where(causal, jnp.exp(jnp.where(causal, b_col - b_row, 0.0)), 0.0)  # [C, C]
  scores = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * decay
  total = b_lanes[c - 1:, :1]  # [1, 1]
  q_in = (q.astype(jnp.float32) * jnp.exp(b_col)).astype(q.dtype)
  out = (jnp.dot(scores.astype(v.dtype), v, preferred_element_type=jnp.float32)
         + jnp.dot(q_in, s_scr[...].astype(q.dtype), preferred_element_type=jnp.float32))
  o_ref[...] = out.astype(o_ref.dtype)
  k_out = (k.astype(jnp.float32) * jnp.exp(total - b_col)).astype(k.dtype)
  s_scr[...] = jnp.exp(total) * s_scr[...] + lax.dot_general(k_out, v, _TN, preferred_element_type=jnp.float32)


def forward(st: KernelParams, q, k, v, b_lanes, *, name: str = "gated_linear_fwd"):
  """`[B, H, Lp, *]` q, k, v and the within-chunk cumulative log-decays `[B, H, Lp, 128]` -> o `[B, H, Lp, V]`."""
  bsz, h, length, dk = q.shape
  dv, c = v.shape[-1], st.chunk
  spec = lambda dim: pl.BlockSpec((None, None, c, dim), lambda b, hh, n: (b, hh, n, 0))  # noqa: E731
  return pl.pallas_call(
      _fwd_kernel, grid=(bsz, h, length // c),
      in_specs=[spec(dk), spec(dk), spec(dv), spec(LANES)], out_specs=spec(dv),
      out_shape=jax.ShapeDtypeStruct((bsz, h, length, dv), v.dtype),
      scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=st.interpret, name=name)(q, k, v, b_lanes)


__all__ = ["forward"]
