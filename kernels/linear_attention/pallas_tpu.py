"""TPU (Mosaic TPU) kernels of chunked linear attention; the maths is in `kernels.linear_attention.pallas`.

`pl.pallas_call` over the grid `(batch, heads, chunks)`: the chunk axis is "arbitrary" where a state is carried across
chunks (held in VMEM scratch), "parallel" where a kernel only applies a reduced state. `interpret=True` runs the same
kernels on CPU. Causal: one forward kernel and two backward kernels (dq walking forward, dk/dv walking backward).
Non-causal: a state kernel reduces `S, z` (and in the backward pass `P, y`) over the chunks, then a parallel kernel
applies them. Matmul operands keep the input dtype with float32 accumulation; states and normalizers are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.linear_attention.tables import LANES as _LANES
from kernels.linear_attention.tables import KernelParams

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _lanes(x_Cx128: jax.Array, width: int) -> jax.Array:
  if width <= _LANES:
    return x_Cx128[:, :width]
  return jnp.tile(x_Cx128, (1, width // _LANES))


def _tril(x_CxC: jax.Array) -> jax.Array:
  rows = lax.broadcasted_iota(jnp.int32, x_CxC.shape, 0)
  cols = lax.broadcasted_iota(jnp.int32, x_CxC.shape, 1)
  return jnp.where(cols <= rows, x_CxC, 0.0)


def _f32(x):
  return x.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------------
# TPU kernels: causal.


def _causal_fwd_kernel(q_ref, k_ref, v_ref, o_ref, *rest, normalize: bool, eps: float):
  r_ref, s_scr, z_scr = rest if normalize else (None, *rest)

  @pl.when(pl.program_id(2) == 0)
  def _init():
    s_scr[...] = jnp.zeros_like(s_scr)
    z_scr[...] = jnp.zeros_like(z_scr)

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  a = _tril(lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32))  # [C, C]
  num = (jnp.dot(a.astype(v.dtype), v, preferred_element_type=jnp.float32)
         + jnp.dot(q, s_scr[...].astype(q.dtype), preferred_element_type=jnp.float32))
  if normalize:
    den = jnp.sum(a, axis=1, keepdims=True) + jnp.sum(_f32(q) * z_scr[...], axis=1, keepdims=True)  # [C, 1]
    r = den + eps
    num = num / r
    r_ref[...] = jnp.broadcast_to(r, r_ref.shape)
  o_ref[...] = num.astype(o_ref.dtype)
  s_scr[...] += lax.dot_general(k, v, _TN, preferred_element_type=jnp.float32)
  z_scr[...] += jnp.sum(_f32(k), axis=0, keepdims=True)


def _causal_dq_kernel(k_ref, v_ref, gn_ref, *rest, normalize: bool):
  gd_ref, dq_ref, s_scr, z_scr = rest if normalize else (None, *rest)

  @pl.when(pl.program_id(2) == 0)
  def _init():
    s_scr[...] = jnp.zeros_like(s_scr)
    z_scr[...] = jnp.zeros_like(z_scr)

  k, v, gn = k_ref[...], v_ref[...], gn_ref[...]
  da = lax.dot_general(gn, v, _NT, preferred_element_type=jnp.float32)  # [C, C]
  if normalize:
    da = da + _lanes(gd_ref[...], da.shape[1])
  da = _tril(da)
  dq = (jnp.dot(da.astype(k.dtype), k, preferred_element_type=jnp.float32)
        + lax.dot_general(gn, s_scr[...].astype(gn.dtype), _NT, preferred_element_type=jnp.float32))
  if normalize:
    dq = dq + gd_ref[...][:, :1] * z_scr[...]
  dq_ref[...] = dq.astype(dq_ref.dtype)
  s_scr[...] += lax.dot_general(k, v, _TN, preferred_element_type=jnp.float32)
  z_scr[...] += jnp.sum(_f32(k), axis=0, keepdims=True)


def _causal_dkv_kernel(q_ref, k_ref, v_ref, gn_ref, *rest, normalize: bool):
  """Walks the chunks from the last to the first (the index maps reverse the grid's chunk axis)."""
  gd_ref, dk_ref, dv_ref, p_scr, y_scr = rest if normalize else (None, *rest)

  @pl.when(pl.program_id(2) == 0)
  def _init():
    p_scr[...] = jnp.zeros_like(p_scr)
    y_scr[...] = jnp.zeros_like(y_scr)

  q, k, v, gn = q_ref[...], k_ref[...], v_ref[...], gn_ref[...]
  a = _tril(lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32))  # [t, s]
  da = lax.dot_general(gn, v, _NT, preferred_element_type=jnp.float32)
  if normalize:
    da = da + _lanes(gd_ref[...], da.shape[1])
  da = _tril(da)
  p_state = p_scr[...].astype(q.dtype)  # [F, D]
  dk = (lax.dot_general(da.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
        + lax.dot_general(v, p_state, _NT, preferred_element_type=jnp.float32))
  dv = (lax.dot_general(a.astype(gn.dtype), gn, _TN, preferred_element_type=jnp.float32)
        + jnp.dot(k, p_state, preferred_element_type=jnp.float32))
  if normalize:
    dk = dk + y_scr[...]
    y_scr[...] += jnp.sum(gd_ref[...][:, :1] * _f32(q), axis=0, keepdims=True)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  p_scr[...] += lax.dot_general(q, gn, _TN, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------------------------------
# TPU kernels: non-causal.


def _state_kernel(x_ref, y_ref, *rest, weighted: bool, with_norm: bool):
  """Accumulates `x^T y` and (with_norm) the column sums of `x` (weighted by the per-row `w`) into resident outputs."""
  if weighted:
    w_ref, *rest = rest
  s_ref, *rest = rest
  z_ref = rest[0] if with_norm else None

  @pl.when(pl.program_id(2) == 0)
  def _init():
    s_ref[...] = jnp.zeros_like(s_ref)
    if with_norm:
      z_ref[...] = jnp.zeros_like(z_ref)

  x = x_ref[...]
  s_ref[...] += lax.dot_general(x, y_ref[...], _TN, preferred_element_type=jnp.float32)
  if with_norm:
    xw = _f32(x) * w_ref[...][:, :1] if weighted else _f32(x)
    z_ref[...] += jnp.sum(xw, axis=0, keepdims=True)


def _apply_kernel(q_ref, s_ref, *rest, normalize: bool, eps: float):
  z_ref, o_ref, r_ref = rest if normalize else (None, *rest, None)
  q = q_ref[...]
  num = jnp.dot(q, s_ref[...].astype(q.dtype), preferred_element_type=jnp.float32)
  if normalize:
    r = jnp.sum(_f32(q) * z_ref[...], axis=1, keepdims=True) + eps
    num = num / r
    r_ref[...] = jnp.broadcast_to(r, r_ref.shape)
  o_ref[...] = num.astype(o_ref.dtype)


def _grad_kernel(k_ref, v_ref, gn_ref, s_ref, p_ref, *rest, normalize: bool):
  if normalize:
    gd_ref, z_ref, y_ref, dq_ref, dk_ref, dv_ref = rest
  else:
    dq_ref, dk_ref, dv_ref = rest
  k, v, gn = k_ref[...], v_ref[...], gn_ref[...]
  p_state = p_ref[...].astype(k.dtype)
  dq = lax.dot_general(gn, s_ref[...].astype(gn.dtype), _NT, preferred_element_type=jnp.float32)
  dk = lax.dot_general(v, p_state, _NT, preferred_element_type=jnp.float32)
  if normalize:
    dq = dq + gd_ref[...][:, :1] * z_ref[...]
    dk = dk + y_ref[...]
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = jnp.dot(k, p_state, preferred_element_type=jnp.float32).astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# TPU wrappers ([B, H, Lp, *] tensors, Lp a multiple of the chunk).


def _spec(chunk: int, dim: int, reverse_of: int | None = None):
  if reverse_of is None:
    return pl.BlockSpec((None, None, chunk, dim), lambda b, h, c: (b, h, c, 0))
  return pl.BlockSpec((None, None, chunk, dim), lambda b, h, c: (b, h, reverse_of - 1 - c, 0))


def _whole(shape):  # a per-(batch, head) block resident across the chunk axis
  return pl.BlockSpec((None, None, *shape), lambda b, h, c: (b, h, 0, 0))


def _call(st: KernelParams, kernel, grid, in_specs, out_specs, out_shape, scratch, sequential: bool,
          name: str):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary" if sequential else "parallel")),
      interpret=st.interpret, name=name)


def forward(st: KernelParams, q, k, v):
  """[B, H, Lp, *] -> (o, r = den + eps [B, H, Lp] or None, states for the backward pass)."""
  b, h, length, f = q.shape
  d, c = v.shape[-1], st.chunk
  grid = (b, h, length // c)
  o_shape = jax.ShapeDtypeStruct((b, h, length, d), v.dtype)
  r_shape = jax.ShapeDtypeStruct((b, h, length, _LANES), jnp.float32)
  outs = [o_shape, r_shape] if st.normalize else [o_shape]
  out_specs = [_spec(c, d), _spec(c, _LANES)] if st.normalize else [_spec(c, d)]
  if st.causal:
    res = _call(st, functools.partial(_causal_fwd_kernel, normalize=st.normalize, eps=st.eps), grid,
                [_spec(c, f), _spec(c, f), _spec(c, d)], out_specs, outs,
                [pltpu.VMEM((f, d), jnp.float32), pltpu.VMEM((1, f), jnp.float32)], True,
                "linear_attention_fwd")(q, k, v)
  else:
    state_outs = [jax.ShapeDtypeStruct((b, h, f, d), jnp.float32)]
    state_specs = [_whole((f, d))]
    if st.normalize:
      state_outs.append(jax.ShapeDtypeStruct((b, h, 1, f), jnp.float32))
      state_specs.append(_whole((1, f)))
    states = _call(st, functools.partial(_state_kernel, weighted=False, with_norm=st.normalize), grid,
                   [_spec(c, f), _spec(c, d)], state_specs, state_outs, [], True, "linear_attention_fwd_state")(k, v)
    res = _call(st, functools.partial(_apply_kernel, normalize=st.normalize, eps=st.eps), grid,
                [_spec(c, f), *state_specs], out_specs, outs, [], False, "linear_attention_fwd")(q, *states)
    res = (*res, *states)
  o = res[0]
  r = res[1][..., 0] if st.normalize else None
  states = tuple(res[2 if st.normalize else 1:])
  return o, r, states


def backward(st: KernelParams, q, k, v, gn, gd, states):
  """gn: [B,H,Lp,D] (input dtype); gd: [B,H,Lp] float32 or None."""
  b, h, length, f = q.shape
  d, c = v.shape[-1], st.chunk
  n = length // c
  grid = (b, h, n)
  gd_lanes = None if gd is None else jnp.broadcast_to(gd[..., None], (*gd.shape, _LANES))
  dq_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
  dk_shape = jax.ShapeDtypeStruct(k.shape, k.dtype)
  dv_shape = jax.ShapeDtypeStruct(v.shape, v.dtype)
  extra = [gd_lanes] if st.normalize else []
  if st.causal:
    dq = _call(st, functools.partial(_causal_dq_kernel, normalize=st.normalize), grid,
               [_spec(c, f), _spec(c, d), _spec(c, d)] + ([_spec(c, _LANES)] if st.normalize else []),
               _spec(c, f), dq_shape, [pltpu.VMEM((f, d), jnp.float32), pltpu.VMEM((1, f), jnp.float32)], True,
               "linear_attention_bwd_dq")(k, v, gn, *extra)
    rev = lambda dim: _spec(c, dim, reverse_of=n)  # noqa: E731
    dk, dv = _call(st, functools.partial(_causal_dkv_kernel, normalize=st.normalize), grid,
                   [rev(f), rev(f), rev(d), rev(d)] + ([rev(_LANES)] if st.normalize else []),
                   [rev(f), rev(d)], [dk_shape, dv_shape],
                   [pltpu.VMEM((f, d), jnp.float32), pltpu.VMEM((1, f), jnp.float32)], True,
                   "linear_attention_bwd_dkv")(q, k, v, gn, *extra)
    return dq, dk, dv
  p_outs = [jax.ShapeDtypeStruct((b, h, f, d), jnp.float32)]
  p_specs = [_whole((f, d))]
  if st.normalize:
    p_outs.append(jax.ShapeDtypeStruct((b, h, 1, f), jnp.float32))
    p_specs.append(_whole((1, f)))
  grad_states = _call(st, functools.partial(_state_kernel, weighted=st.normalize, with_norm=st.normalize), grid,
                      [_spec(c, f), _spec(c, d)] + ([_spec(c, _LANES)] if st.normalize else []), p_specs, p_outs,
                      [], True, "linear_attention_bwd_state")(q, gn, *extra)
  s_state, p_state = states[0], grad_states[0]
  in_specs = [_spec(c, f), _spec(c, d), _spec(c, d), _whole((f, d)), _whole((f, d))]
  args = [k, v, gn, s_state, p_state]
  if st.normalize:
    in_specs += [_spec(c, _LANES), _whole((1, f)), _whole((1, f))]
    args += [gd_lanes, states[1], grad_states[1]]
  return _call(st, functools.partial(_grad_kernel, normalize=st.normalize), grid, in_specs,
               [_spec(c, f), _spec(c, f), _spec(c, d)], [dq_shape, dk_shape, dv_shape], [], False,
               "linear_attention_bwd")(*args)


__all__ = ["backward", "forward"]
