"""Pallas kernels for chunked linear attention (the public entry and the reference are in
`kernels.linear_attention`).

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

This module is the backend-neutral driver: the custom_vjp that joins the forward and backward kernels of a backend,
"tpu" (`kernels.linear_attention.pallas_tpu`) or "gpu" (Mosaic GPU, `kernels.linear_attention.pallas_gpu`), which
never import each other. A feature map wider than a backend's kernel takes (GPU: 64 or 128; performer's default is
256) is split into feature blocks (`tables.feature_block`) that run as extra heads of one unnormalized kernel call,
since `q S = sum_b q_b S_b` over feature blocks; their numerators are summed in float32 and the normalizer
`q . cumsum(k)` (`q . sum(k)` non-causal) is computed by XLA in float32 (O(L F), no quadratic term). A feature count
no GPU width divides is first zero-padded to a multiple of 64 (`tables.padded_features`: based's 273 Taylor features run
as 320; a zero feature adds nothing to `q k^T` or `q z`). Accumulation is
float32; matmul operands keep the input dtype (the state is rounded to it where it feeds a matmul, as the chunked
kernels of flash-linear-attention do).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from kernels.linear_attention.tables import KernelParams, KernelPlan
from kernels.platform import Backend


def _f32(x):
  return x.astype(jnp.float32)


# Backend -> its kernel module, imported on first use so a TPU program never imports Mosaic GPU and vice versa.
BACKEND_MODULES: dict[Backend, str] = {"tpu": "kernels.linear_attention.pallas_tpu",
                                       "gpu": "kernels.linear_attention.pallas_gpu"}


def _backend(st: KernelParams):
  return importlib.import_module(BACKEND_MODULES[st.backend])


def _forward(st: KernelParams, q, k, v):
  return _backend(st).forward(st, q, k, v)


def _backward(st: KernelParams, q, k, v, gn, gd, states):
  return _backend(st).backward(st, q, k, v, gn, gd, states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear(st: KernelParams, q, k, v):
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


def linear_attention_pallas(q_BxLxHxF: jax.Array, k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array, *, plan: KernelPlan,
                            causal: bool, normalize: bool = True, eps: float = 1e-6, interpret=False) -> jax.Array:
  """Linear attention through the Pallas kernels of `plan.backend`, `[B, L, H, *]` in, `[B, L, H, D]` (dtype of v)
  out, as `plan` (`tables.plan`, made once by `kernels.linear_attention`) says: nothing is checked again here.

  Features are zero-padded to `plan.features` (a zero feature adds nothing to `q k^T` or `q z`; its gradients are
  dropped), run as feature blocks when `plan.block` is narrower, and the length is zero-padded to a multiple of the
  chunk (zero rows add nothing to the states; their outputs are dropped).
  """
  features = q_BxLxHxF.shape[-1]
  if plan.features != features:
    widths = ((0, 0),) * 3 + ((0, plan.features - features),)
    q_BxLxHxF, k_BxLxHxF = jnp.pad(q_BxLxHxF, widths), jnp.pad(k_BxLxHxF, widths)
  if plan.block != plan.features:
    return feature_blocked(q_BxLxHxF, k_BxLxHxF, v_BxLxHxD, plan=plan, causal=causal, normalize=normalize, eps=eps,
                           interpret=interpret)
  return _kernel_call(q_BxLxHxF, k_BxLxHxF, v_BxLxHxD, plan=plan, causal=causal, normalize=normalize, eps=eps,
                      interpret=interpret)


def _kernel_call(q_BxLxHxF, k_BxLxHxF, v_BxLxHxD, *, plan: KernelPlan, causal, normalize, eps, interpret):
  """One kernel call (the features are one block): `[B, L, H, *]` -> `[B, H, Lp, *]` and back."""
  dtype = jnp.result_type(q_BxLxHxF.dtype, k_BxLxHxF.dtype, v_BxLxHxD.dtype)
  length = q_BxLxHxF.shape[1]
  pad = -length % plan.chunk

  def prep(x):  # [B, L, H, *] -> [B, H, Lp, *] in the common dtype
    x = jnp.swapaxes(x.astype(dtype), 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x

  st = KernelParams(causal=bool(causal), normalize=bool(normalize), eps=float(eps), chunk=plan.chunk,
                    backend=plan.backend, interpret=interpret)
  out = _linear(st, prep(q_BxLxHxF), prep(k_BxLxHxF), prep(v_BxLxHxD))
  return jnp.swapaxes(out[:, :, :length], 1, 2).astype(v_BxLxHxD.dtype)


def feature_blocked(q_BxLxHxF: jax.Array, k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array, *, plan: KernelPlan,
                    causal: bool, normalize: bool = True, eps: float = 1e-6, interpret=False) -> jax.Array:
  """`linear_attention_pallas` for a feature map wider than one kernel call takes: the `nb = F // plan.block` feature
  blocks become `nb` times the heads of one unnormalized kernel call (values repeated per block), numerators summed
  in float32, the normalizer from XLA. (Any backend: tests check it on the TPU kernels in float32 too.)"""
  b, length, h, features = q_BxLxHxF.shape
  nb = features // plan.block
  split = lambda x: x.reshape(b, length, h * nb, plan.block)  # noqa: E731  head h, block j -> head h * nb + j
  num = _kernel_call(split(q_BxLxHxF), split(k_BxLxHxF), jnp.repeat(v_BxLxHxD, nb, axis=2), plan=plan,
                     causal=causal, normalize=False, eps=eps, interpret=interpret)
  out = jnp.sum(_f32(num).reshape(b, length, h, nb, -1), axis=3)
  if normalize:
    k_sum = jnp.cumsum(_f32(k_BxLxHxF), axis=1) if causal else jnp.sum(_f32(k_BxLxHxF), axis=1, keepdims=True)
    den_BxLxH = jnp.sum(_f32(q_BxLxHxF) * k_sum, axis=-1)
    out = out / (den_BxLxH[..., None] + eps)
  return out.astype(v_BxLxHxD.dtype)


__all__ = ["BACKEND_MODULES", "KernelPlan", "feature_blocked", "linear_attention_pallas"]
