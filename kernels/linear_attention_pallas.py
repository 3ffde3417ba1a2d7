"""Pallas kernels for chunked linear attention (see `kernels.linear_attention` for the maths and the reference).

Per chunk of `C` positions, with `A = q k^T` (lower-triangular when causal) and the running state `S = sum k^T v`
(`[F, D]`) and normalizer `z = sum k` (`[F]`) of the earlier chunks:
  num = A v + q S,   den = A 1 + q z,   out = num / (den + eps)   (normalize=False: out = num).
The backward pass works on `gn = g / r` and `gd = -(g . out) / r` (r = den + eps; gn = g, gd = 0 without the
normalizer), i.e. the cotangent of the augmented value `[v, 1]`, with `dA = gn v^T + gd` (masked like A):
  dq = dA k + gn S^T + gd z          (forward over chunks: S, z of the earlier chunks)
  dk = dA^T q + v P^T + y            (reverse over chunks: P = sum q^T gn, y = sum gd q of the later chunks)
  dv = A^T gn + k P
Causal: one forward kernel and two backward kernels (dq walking forward, dk/dv walking backward), each carrying its
state across the sequential chunk axis in on-chip scratch. Non-causal: every query sees the total state, so a state
kernel reduces `S, z` (and in the backward pass `P, y`) over the chunks and a parallel kernel applies them.

Backends: "tpu" (`pl.pallas_call`, grid `(batch, heads, chunks)`, chunk axis "arbitrary" for the carried state,
state in VMEM scratch; `interpret=True` runs the same kernels on CPU) and "gpu" (Mosaic GPU, see
`kernels.linear_attention_pallas_gpu`). Accumulation is float32; matmul operands keep the input dtype (the state is
rounded to it where it feeds a matmul, as the chunked kernels of flash-linear-attention do).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Backend = Literal["tpu", "gpu"]
_LANES = 128  # per-row scalars travel lane-broadcast, [C, 128], as in jax's TPU attention kernels
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class ChunkSizes:
  """`chunk`: positions per chunk (the intra-chunk `[C, C]` block). None picks the backend default: 128 on TPU (the
  MXU width), 64 on GPU (the wgmma rows of one warpgroup)."""

  chunk: int | None = None

  def resolve(self, backend: Backend) -> int:
    chunk = (128 if backend == "tpu" else 64) if self.chunk is None else self.chunk
    if not isinstance(chunk, int) or chunk < 1:
      raise ValueError(f"chunk must be a positive integer, got chunk={chunk}")
    return chunk


def accelerator_backend() -> Backend | None:
  """The kernel backend of the default JAX backend: "tpu", "gpu" (Mosaic GPU), or None (no kernel: CPU)."""
  platform = jax.default_backend()
  return "tpu" if platform == "tpu" else "gpu" if platform in ("gpu", "cuda") else None


def check_supported(q_shape, v_shape, dtype, chunk: int, backend: Backend) -> None:
  """Raises ValueError naming the value and the constraint the backend's kernel imposes."""
  features, head_dim = q_shape[-1], v_shape[-1]
  if backend == "tpu":
    if chunk % 8:
      raise ValueError(f"{chunk=} must be a multiple of 8 on TPU (sublane tiling of the [chunk, dim] blocks)")
    if head_dim > _LANES and head_dim % _LANES:
      raise ValueError(f"{head_dim=} must be <= {_LANES} or a multiple of {_LANES} on TPU")
  else:
    if chunk % 64:
      raise ValueError(f"{chunk=} must be a multiple of 64 on GPU (wgmma tiles of one warpgroup)")
    for name, value in (("features", features), ("head_dim", head_dim)):
      if value % 64 or value > 128:
        raise ValueError(f"{name}={value} must be 64 or 128 on GPU (swizzled wgmma operands; the state blocks and "
                         f"the double-buffered chunk tiles must fit in registers and shared memory)")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      raise ValueError(f"dtype={jnp.dtype(dtype).name} is not supported by the GPU kernel (wgmma operands): "
                       f"use bfloat16 or float16, or implementation='xla'")


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


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  normalize: bool
  eps: float
  chunk: int
  backend: Backend
  interpret: object


def _spec(chunk: int, dim: int, reverse_of: int | None = None):
  if reverse_of is None:
    return pl.BlockSpec((None, None, chunk, dim), lambda b, h, c: (b, h, c, 0))
  return pl.BlockSpec((None, None, chunk, dim), lambda b, h, c: (b, h, reverse_of - 1 - c, 0))


def _whole(shape):  # a per-(batch, head) block resident across the chunk axis
  return pl.BlockSpec((None, None, *shape), lambda b, h, c: (b, h, 0, 0))


def _call(st: _Static, kernel, grid, in_specs, out_specs, out_shape, scratch, sequential: bool, name: str):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary" if sequential else "parallel")),
      interpret=st.interpret, name=name)


def _tpu_forward(st: _Static, q, k, v):
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


def _tpu_backward(st: _Static, q, k, v, gn, gd, states):
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


# ----------------------------------------------------------------------------------------------------------------------
# custom_vjp glue.


def _forward(st: _Static, q, k, v):
  if st.backend == "gpu":
    from kernels import linear_attention_pallas_gpu as gpu  # noqa: PLC0415
    return gpu.forward(st, q, k, v)
  return _tpu_forward(st, q, k, v)


def _backward(st: _Static, q, k, v, gn, gd, states):
  if st.backend == "gpu":
    from kernels import linear_attention_pallas_gpu as gpu  # noqa: PLC0415
    return gpu.backward(st, q, k, v, gn, gd, states)
  return _tpu_backward(st, q, k, v, gn, gd, states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear(st: _Static, q, k, v):
  return _forward(st, q, k, v)[0]


def _linear_fwd(st, q, k, v):
  o, r, states = _forward(st, q, k, v)
  return o, (q, k, v, o, r, states)


def _linear_bwd(st, res, g):
  q, k, v, o, r, states = res
  if st.normalize:
    g32 = _f32(g)
    gn = (g32 / r[..., None]).astype(q.dtype)
    gd = -jnp.sum(g32 * _f32(o), axis=-1) / r
  else:
    gn, gd = g.astype(q.dtype), None
  return tuple(_backward(st, q, k, v, gn, gd, states))


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_attention_pallas(q_BxLxHxF: jax.Array, k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array, *, causal: bool,
                            normalize: bool = True, eps: float = 1e-6, chunk_sizes: ChunkSizes | None = None,
                            backend: Backend = "tpu", interpret=False) -> jax.Array:
  """Linear attention through the Pallas kernels of `backend`, `[B, L, H, *]` in, `[B, L, H, D]` (dtype of v) out.

  The length is zero-padded to a multiple of the chunk (zero rows add nothing to the states; their outputs are
  dropped). Shapes are assumed checked by `kernels.linear_attention`; the kernel constraints are checked here.
  """
  chunk = (chunk_sizes or ChunkSizes()).resolve(backend)
  dtype = jnp.result_type(q_BxLxHxF.dtype, k_BxLxHxF.dtype, v_BxLxHxD.dtype)
  check_supported(q_BxLxHxF.shape, v_BxLxHxD.shape, dtype, chunk, backend)
  length = q_BxLxHxF.shape[1]
  pad = -length % chunk

  def prep(x):  # [B, L, H, *] -> [B, H, Lp, *] in the common dtype
    x = jnp.swapaxes(x.astype(dtype), 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x

  st = _Static(causal=bool(causal), normalize=bool(normalize), eps=float(eps), chunk=chunk, backend=backend,
               interpret=interpret)
  out = _linear(st, prep(q_BxLxHxF), prep(k_BxLxHxF), prep(v_BxLxHxD))
  return jnp.swapaxes(out[:, :, :length], 1, 2).astype(v_BxLxHxD.dtype)


__all__ = ["ChunkSizes", "accelerator_backend", "check_supported", "linear_attention_pallas"]
