"""Chunked linear attention in pure JAX (memory linear in length), and the one-token decode step.

Mixed precision, as in the Pallas kernels: matmul operands keep the input dtype (bfloat16 inputs run bfloat16
matmuls) with float32 accumulation (`preferred_element_type`); the carried state `S`, the normalizer `z` and the
denominator are float32, and the state is rounded to the input dtype only where it feeds a matmul. float32 inputs
compute in float32 throughout. The output has v's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.linear_attention.reference import DEFAULT_EPS

_F32 = jnp.float32


def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum of two operands in their (common) dtype with float32 accumulation."""
  dtype = jnp.result_type(a, b)
  a, b = a.astype(dtype), b.astype(dtype)
  if dtype == _F32:
    return jnp.einsum(spec, a, b)
  mixed = lambda: jnp.einsum(spec, a, b, preferred_element_type=_F32)  # noqa: E731
  # XLA:CPU has no bfloat16 x bfloat16 -> float32 dot for some dimension orders ("Unsupported element type for
  # DotThunk"). Upcasting first computes the same products (exact in float32) and sums; CPU has no fast bf16 anyway.
  upcast = lambda: jnp.einsum(spec, a.astype(_F32), b.astype(_F32))  # noqa: E731
  return jax.lax.platform_dependent(cpu=upcast, default=mixed)


def _pad_to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
  # Zero rows add nothing to the state or the normalizer; their outputs are sliced off.
  pad = -x.shape[1] % chunk_size
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def linear_attention_xla(q_BxLxHxF: jax.Array, k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array, *, causal: bool,
                         normalize: bool = True, chunk_size: int = 64, eps: float = DEFAULT_EPS) -> jax.Array:
  """Chunked linear attention; memory grows linearly with length (see the module docstring for precision)."""
  dtype = jnp.result_type(q_BxLxHxF, k_BxLxHxF, v_BxLxHxD)
  q, k, v = (x.astype(dtype) for x in (q_BxLxHxF, k_BxLxHxF, v_BxLxHxD))
  b, length, h, _ = q.shape
  if not causal:
    # Every query sees the same state: one sum over the sequence, no [L, L] scores at all.
    state_BxHxFxD = _mm("blhf,blhd->bhfd", k, v)
    out = _mm("blhf,bhfd->blhd", q, state_BxHxFxD.astype(dtype))
    if normalize:
      norm_BxHxF = jnp.sum(k, axis=1, dtype=_F32)
      out = out / (jnp.einsum("blhf,bhf->blh", q.astype(_F32), norm_BxHxF)[..., None] + eps)
    return out.astype(v_BxLxHxD.dtype)

  chunk = min(chunk_size, length)
  q, k, v = (_pad_to_chunks(x, chunk) for x in (q, k, v))
  n = q.shape[1] // chunk
  # [N, B, C, H, F]: chunks lead so lax.scan walks over them.
  to_chunks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, h, x.shape[-1]), 1, 0)  # noqa: E731
  tril_CxC = jnp.tril(jnp.ones((chunk, chunk), bool))

  def step(carry, qkv):
    state_BxHxFxD, norm_BxHxF = carry
    q_c, k_c, v_c = qkv
    scores_BxHxCxC = jnp.where(tril_CxC, _mm("bchf,bshf->bhcs", q_c, k_c), 0.0)
    out = _mm("bhcs,bshd->bchd", scores_BxHxCxC.astype(dtype), v_c) + _mm("bchf,bhfd->bchd", q_c,
                                                                         state_BxHxFxD.astype(dtype))
    den = jnp.sum(scores_BxHxCxC, axis=-1).transpose(0, 2, 1) + jnp.einsum("bchf,bhf->bch", q_c.astype(_F32),
                                                                            norm_BxHxF)
    carry = (state_BxHxFxD + _mm("bchf,bchd->bhfd", k_c, v_c), norm_BxHxF + jnp.sum(k_c, axis=1, dtype=_F32))
    return carry, (out, den)

  init = (jnp.zeros((b, h, q.shape[-1], v.shape[-1]), _F32), jnp.zeros((b, h, q.shape[-1]), _F32))
  _, (out, den) = jax.lax.scan(step, init, (to_chunks(q), to_chunks(k), to_chunks(v)))
  if normalize:
    out = out / (den[..., None] + eps)
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, h, v.shape[-1])[:, :length]
  return out.astype(v_BxLxHxD.dtype)


def linear_attention_step(state: tuple[jax.Array, jax.Array], q_BxHxF: jax.Array, k_BxHxF: jax.Array,
                          v_BxHxD: jax.Array, *, normalize: bool = True, eps: float = DEFAULT_EPS):
  """One causal decoding step: adds `(k_t, v_t)` to the float32 state `(S [B,H,F,D], z [B,H,F])` and reads it with
  `q_t`. Returns `(new_state, out [B, H, D])` (out in v's dtype); the state size does not depend on the length."""
  state_BxHxFxD, norm_BxHxF = state
  q, k, v = q_BxHxF.astype(_F32), k_BxHxF.astype(_F32), v_BxHxD.astype(_F32)
  state_BxHxFxD = state_BxHxFxD + jnp.einsum("bhf,bhd->bhfd", k, v)
  norm_BxHxF = norm_BxHxF + k
  out = jnp.einsum("bhf,bhfd->bhd", q, state_BxHxFxD)
  if normalize:
    out = out / (jnp.einsum("bhf,bhf->bh", q, norm_BxHxF)[..., None] + eps)
  return (state_BxHxFxD, norm_BxHxF), out.astype(v_BxHxD.dtype)


__all__ = ["linear_attention_step", "linear_attention_xla"]
