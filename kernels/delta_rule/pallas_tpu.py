"""TPU (Mosaic TPU) kernels of the delta rule's sequential part, forward and backward; the maths and the chunk
transforms (computed in XLA) are in `kernels.delta_rule.pallas`.

`pl.pallas_call` over the grid `(batch, heads, chunks)`, the chunk axis "arbitrary": a float32 `[K, V]` carry lives in
VMEM scratch, from the initial state (the first chunk) to the final state (written at the last). Forward, per chunk
(inputs `qg, w, kd [C, K]`, `u [C, V]`, `m [C, C]`, the chunk's total decay `dc`):
  E = U - W S,   O = Qg S + M E,   S <- dc S + Kd^T E
(the entering state S of every chunk is also written out when the pass is differentiated: `[N, K, V]` per row, the
backward pass's only residual besides the inputs). Backward walks the chunks in reverse carrying `dS` (the cotangent
of the state leaving the chunk: first the final state's, after the first chunk the initial state's):
  dE = M^T dO + Kd dS,  dQg = dO S^T,  dM = dO E^T,  dKd = E dS^T,  dU = dE,  dW = -dE S^T,  d dc = sum(S * dS),
  dS <- Qg^T dO + dc dS - W^T dE.
Matmul operands have the inputs' dtype with float32 accumulation. `interpret=True` runs the same kernels on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.delta_rule.tables import LANES, SUBLANES, KernelParams

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_F32 = jnp.float32


def _mm(a, b, dims=None, dtype=None):
  """A matmul with operands cast to `dtype` (the inputs') and float32 accumulation."""
  dtype = dtype or a.dtype
  a, b = a.astype(dtype), b.astype(dtype)
  if dims is None:
    return jnp.dot(a, b, preferred_element_type=_F32)
  return lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _fwd_kernel(qg_ref, m_ref, u_ref, w_ref, kd_ref, dc_ref, s0_ref, o_ref, *rest):
  s_scr, sf_ref = rest[-1], rest[-2]
  states_ref = rest[0] if len(rest) == 3 else None

  @pl.when(pl.program_id(2) == 0)
  def _init():
    s_scr[...] = s0_ref[...]

  dt = qg_ref.dtype
  s = s_scr[...]
  if states_ref is not None:
    states_ref[...] = s
  e = u_ref[...].astype(_F32) - _mm(w_ref[...], s, dtype=dt)  # [C, V]
  o_ref[...] = (_mm(qg_ref[...], s, dtype=dt) + _mm(m_ref[...], e, dtype=dt)).astype(o_ref.dtype)
  dc = dc_ref[...][:1, :1]  # [1, 1]
  s_scr[...] = dc * s + _mm(kd_ref[...], e, _TN, dtype=dt)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _final():
    sf_ref[...] = s_scr[...]


def _bwd_kernel(qg_ref, m_ref, u_ref, w_ref, kd_ref, dc_ref, s_ref, do_ref, dsf_ref,
                dqg_ref, dm_ref, du_ref, dw_ref, dkd_ref, ddc_ref, ds0_ref, ds_scr):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    ds_scr[...] = dsf_ref[...]

  dt = qg_ref.dtype
  s, ds = s_ref[...], ds_scr[...]  # the state entering the chunk; the cotangent of the one leaving it
  qg, m, w, kd, do = qg_ref[...], m_ref[...], w_ref[...], kd_ref[...], do_ref[...]
  e = u_ref[...].astype(_F32) - _mm(w, s, dtype=dt)  # recomputed: [C, V]
  de = _mm(m, do, _TN, dtype=dt) + _mm(kd, ds, dtype=dt)  # [C, V]
  dqg_ref[...] = _mm(do, s, _NT, dtype=dt).astype(dqg_ref.dtype)
  dm_ref[...] = _mm(do, e, _NT, dtype=dt).astype(dm_ref.dtype)
  dkd_ref[...] = _mm(e, ds, _NT, dtype=dt).astype(dkd_ref.dtype)
  du_ref[...] = de.astype(du_ref.dtype)
  dw_ref[...] = (-_mm(de, s, _NT, dtype=dt)).astype(dw_ref.dtype)
  ddc = jnp.sum(jnp.sum(s * ds, axis=1, keepdims=True), axis=0, keepdims=True)  # [1, 1]
  ddc_ref[...] = jnp.broadcast_to(ddc, ddc_ref.shape)
  dc = dc_ref[...][:1, :1]
  ds_scr[...] = _mm(qg, do, _TN, dtype=dt) + dc * ds - _mm(w, de, _TN, dtype=dt)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _first_chunk():
    ds0_ref[...] = ds_scr[...]


def _specs(c: int, dk: int, dv: int, n: int, reverse: bool):
  """Block specs of the per-token `[C, dim]` blocks, the per-chunk `[8, 128]` scalar tiles and `[K, V]` states."""
  chunk = (lambda i: n - 1 - i) if reverse else (lambda i: i)  # noqa: E731
  tok = lambda dim: pl.BlockSpec((None, None, c, dim), lambda b, h, i: (b, h, chunk(i), 0))  # noqa: E731
  tile = pl.BlockSpec((None, None, None, SUBLANES, LANES), lambda b, h, i: (b, h, chunk(i), 0, 0))
  state = pl.BlockSpec((None, None, None, dk, dv), lambda b, h, i: (b, h, chunk(i), 0, 0))
  return tok, tile, state


def _row_state(dk: int, dv: int):
  """The `[K, V]` block of a per-row state (initial or final, or their cotangents): the same block for every chunk."""
  return pl.BlockSpec((None, None, dk, dv), lambda b, h, i: (b, h, 0, 0))


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _tiles(dc_BxHxN: jax.Array) -> jax.Array:
  """A chunk's decay as one `[8, 128]` tile (every entry the same): `[B, H, N, 8, 128]`."""
  return jnp.broadcast_to(dc_BxHxN[..., None, None], (*dc_BxHxN.shape, SUBLANES, LANES))


def forward(st: KernelParams, qg, m, u, w, kd, dc, s0, *, save_states: bool):
  """`[B, H, Lp, *]` qg, m, u, w, kd, the chunks' total decays `[B, H, N]` and the initial state `[B, H, K, V]`
  (float32) -> (o `[B, H, Lp, V]` float32, the states entering each chunk `[B, H, N, K, V]` float32 when
  `save_states` else None, the final state `[B, H, K, V]` float32)."""
  bsz, h, length, dk = qg.shape
  dv, c = u.shape[-1], st.chunk
  n = length // c
  tok, tile, state = _specs(c, dk, dv, n, reverse=False)
  out_specs = [tok(dv)] + ([state] if save_states else []) + [_row_state(dk, dv)]
  out_shape = ([jax.ShapeDtypeStruct((bsz, h, length, dv), _F32)]
               + ([jax.ShapeDtypeStruct((bsz, h, n, dk, dv), _F32)] if save_states else [])
               + [jax.ShapeDtypeStruct((bsz, h, dk, dv), _F32)])
  outs = pl.pallas_call(
      _fwd_kernel, grid=(bsz, h, n),
      in_specs=[tok(dk), tok(c), tok(dv), tok(dk), tok(dk), tile, _row_state(dk, dv)], out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=[pltpu.VMEM((dk, dv), _F32)], compiler_params=_params(),
      interpret=st.interpret, name="delta_rule_fwd")(qg, m, u, w, kd, _tiles(dc), s0.astype(_F32))
  return tuple(outs) if save_states else (outs[0], None, outs[1])


def backward(st: KernelParams, qg, m, u, w, kd, dc, states, do, dsf):
  """The cotangents of `forward`'s inputs (float32; `d dc` `[B, H, N]`, `d s0` `[B, H, K, V]`), from the states it
  saved and the cotangents of its outputs `do`, `dsf` (the final state's)."""
  dc_tiles = _tiles(dc)
  bsz, h, length, dk = qg.shape
  dv, c = u.shape[-1], st.chunk
  n = length // c
  tok, tile, state = _specs(c, dk, dv, n, reverse=True)
  shape = lambda x: jax.ShapeDtypeStruct(x.shape, _F32)  # noqa: E731
  grads = pl.pallas_call(
      _bwd_kernel, grid=(bsz, h, n),
      in_specs=[tok(dk), tok(c), tok(dv), tok(dk), tok(dk), tile, state, tok(dv), _row_state(dk, dv)],
      out_specs=[tok(dk), tok(c), tok(dv), tok(dk), tok(dk), tile, _row_state(dk, dv)],
      out_shape=[shape(x) for x in (qg, m, u, w, kd, dc_tiles, dsf)],
      scratch_shapes=[pltpu.VMEM((dk, dv), _F32)], compiler_params=_params(), interpret=st.interpret,
      name="delta_rule_bwd")(qg, m, u, w, kd, dc_tiles, states, do.astype(_F32), dsf.astype(_F32))
  return (*grads[:-2], grads[-2][..., 0, 0], grads[-1])


__all__ = ["backward", "forward"]
