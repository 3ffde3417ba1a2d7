"""TPU (Mosaic TPU) kernels of chunked gated linear attention with a decay per head (`forward`) or per dimension
(`forward_per_dim`); the maths is in `kernels.gated_linear.pallas`.

`pl.pallas_call` over the grid `(batch, heads, chunks)`, the chunk axis "arbitrary": the `[K, V]` float32 state is
carried across chunks in VMEM scratch. Per chunk, with `b` the cumulative log-decay inside the chunk (lane-broadcast
`[C, 128]`, computed by the driver): `o = ((q k^T) * exp(b_i - b_j) [j <= i]) v + (q * exp(b)) S`, then
`S <- exp(b_C) S + (k * exp(b_C - b))^T v`. Every exponent is <= 0 (masked before `exp`). Matmul operands keep the
input dtype with float32 accumulation. `interpret=True` runs the same kernel on CPU.

A decay per dimension (GLA: `forward_per_dim`) cannot factor the `[C, C]` decay out of a matmul over the whole chunk
(`exp(b_i - b_j)` differs per dimension, and `exp(-b_j)` overflows float32 once a chunk's log-decay passes -88), so
the chunk is cut into sub-chunks of `sub` rows (`tables.sub_chunk`). For query sub-chunk I with `r` the cumulative
log-decay just before it, the earlier sub-chunks enter through matmuls of factors that are both <= 1:
`exp(b_i - b_j) = exp(b_i - r) exp(r - b_j)` (i in I, j before I); the diagonal `[sub, sub]` block is built
elementwise, one key row at a time (exponents masked to the causal pairs before `exp`). `decay_on="key"` decays the
dimension the scores contract over (the forward and the dV call); `decay_on="value"` the output's (the dQ and dK
calls, where the forward's key dimension is the output): `o_i = sum_{j<=i} (q_i . k_j) (v_j * exp(b_i - b_j))`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.gated_linear.tables import LANES, KernelParams, sub_chunk

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


def _diag_kernel(q_ref, k_ref, v_ref, b_ref, o_ref, s_scr, *, sub: int, decay_on: str):
  """One chunk with a decay per dimension (D = the key dim for "key", the value dim for "value"); the state scratch
  holds `S^T [V, K]` ("key": the decay scales its columns) or `S [K, V]` ("value": its columns too)."""
  @pl.when(pl.program_id(2) == 0)
  def _init():
    s_scr[...] = jnp.zeros_like(s_scr)

  f32, dt = jnp.float32, q_ref.dtype
  c = b_ref.shape[0]
  b = b_ref[...]  # [C, D] float32, cumulative inside the chunk
  total = b_ref[c - 1:c, :]  # [1, D]
  state = s_scr[...].astype(dt)
  # The diagonal block is built one key row j at a time with 2-D ops only ([sub, D] rows against a [1, D] row,
  # row j picked by a masked sublane sum), rather than as a [sub, sub, D] array.
  rows = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
  cols = lax.broadcasted_iota(jnp.int32, (1, sub), 1)
  for i in range(c // sub):
    lo, hi = i * sub, (i + 1) * sub
    b_i = b[lo:hi]  # [sub, D]
    q_i, k_i, v_i = q_ref[lo:hi].astype(f32), k_ref[lo:hi].astype(f32), v_ref[lo:hi].astype(f32)
    pick = lambda x, j: jnp.sum(jnp.where(rows == j, x, 0.0), axis=0, keepdims=True)  # noqa: E731  row j, [1, D]
    if decay_on == "key":
      out = lax.dot_general((q_i * jnp.exp(b_i)).astype(dt), state, _NT, preferred_element_type=f32)  # q S
      def column(j, a, q_i=q_i, k_i=k_i, b_i=b_i):  # column j: q_i . (k_j * exp(b_i - b_j))
        w = jnp.exp(jnp.where(rows >= j, b_i - pick(b_i, j), 0.0))  # masked before exp
        return jnp.where(cols == j, jnp.sum(q_i * pick(k_i, j) * w, axis=1, keepdims=True), a)

      a = jnp.where(cols <= rows, lax.fori_loop(0, sub, column, jnp.zeros((sub, sub), f32)), 0.0)
      out += jnp.dot(a.astype(dt), v_ref[lo:hi], preferred_element_type=f32)
      if i:
        r = b_ref[lo - 1:lo, :]  # the log-decay just before this sub-chunk: both factors below are <= 1
        k_r = (k_ref[:lo].astype(f32) * jnp.exp(r - b[:lo])).astype(dt)
        a = lax.dot_general((q_i * jnp.exp(b_i - r)).astype(dt), k_r, _NT, preferred_element_type=f32)
        out += jnp.dot(a.astype(dt), v_ref[:lo], preferred_element_type=f32)
    else:
      out = jnp.exp(b_i) * jnp.dot(q_ref[lo:hi], state, preferred_element_type=f32)
      def row(j, out, q_i=q_i, k_i=k_i, v_i=v_i, b_i=b_i):  # (q_i . k_j) v_j * exp(b_i - b_j) for the rows i >= j
        w = jnp.exp(jnp.where(rows >= j, b_i - pick(b_i, j), 0.0))  # masked before exp
        a_j = jnp.sum(q_i * pick(k_i, j), axis=1, keepdims=True)  # [sub, 1]
        return out + jnp.where(rows >= j, a_j * pick(v_i, j) * w, 0.0)

      out = lax.fori_loop(0, sub, row, out)
      if i:
        r = b_ref[lo - 1:lo, :]
        v_r = (v_ref[:lo].astype(f32) * jnp.exp(r - b[:lo])).astype(dt)
        a = lax.dot_general(q_ref[lo:hi], k_ref[:lo], _NT, preferred_element_type=f32)  # [sub, lo]
        out += jnp.exp(b_i - r) * jnp.dot(a.astype(dt), v_r, preferred_element_type=f32)
    o_ref[lo:hi, :] = out.astype(o_ref.dtype)
  if decay_on == "key":
    k_out = (k_ref[...].astype(f32) * jnp.exp(total - b)).astype(dt)
    s_scr[...] = jnp.exp(total) * s_scr[...] + lax.dot_general(v_ref[...], k_out, _TN, preferred_element_type=f32)
  else:
    v_out = (v_ref[...].astype(f32) * jnp.exp(total - b)).astype(dt)
    s_scr[...] = jnp.exp(total) * s_scr[...] + lax.dot_general(k_ref[...], v_out, _TN, preferred_element_type=f32)


def forward_per_dim(st: KernelParams, q, k, v, cum, *, decay_on: str, name: str = "gated_linear_fwd"):
  """`[B, H, Lp, *]` q, k, v and the within-chunk cumulative log-decays per dimension `cum [B, H, Lp, D]` (D: k's
  dim for `decay_on="key"`, v's for "value") -> o `[B, H, Lp, V]`."""
  bsz, h, length, dk = q.shape
  dv, c = v.shape[-1], st.chunk
  spec = lambda dim: pl.BlockSpec((None, None, c, dim), lambda b, hh, n: (b, hh, n, 0))  # noqa: E731
  kernel = functools.partial(_diag_kernel, sub=sub_chunk(c), decay_on=decay_on)
  return pl.pallas_call(
      kernel, grid=(bsz, h, length // c),
      in_specs=[spec(dk), spec(dk), spec(dv), spec(cum.shape[-1])], out_specs=spec(dv),
      out_shape=jax.ShapeDtypeStruct((bsz, h, length, dv), v.dtype),
      scratch_shapes=[pltpu.VMEM((dv, dk) if decay_on == "key" else (dk, dv), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=st.interpret, name=name)(q, k, v, cum)


__all__ = ["forward", "forward_per_dim"]
