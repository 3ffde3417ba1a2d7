"""Linear attention: `out_t = phi(q_t)·S_t / (phi(q_t)·z_t + eps)`, `S_t = sum phi(k_s) v_s^T`, `z_t = sum phi(k_s)`.

Inputs are already feature-mapped (`q`, `k` non-negative for normalized attention); the sums run over all positions
(non-causal) or over `s <= t` (causal); `key_mask` (bool `[batch, keys]`, True = a real key) drops padded keys from
every sum (their `phi(k)` rows are zeroed). Implementations (the op template of docs/architecture.md "Functional
cores"):
  "reference"  `reference.py`: the quadratic form `(q k^T) v` with a causal mask, float32: the ground truth in tests;
  "xla"        `xla.py`: chunked, quadratic inside chunks of `chunk_size`, the `[F, D]` state carried across chunks by
               `lax.scan` (causal) or a single sum (non-causal): memory linear in length;
  "pallas"     `pallas.py` (the driver: custom_vjp) over `pallas_tpu.py` (Mosaic TPU) and `pallas_gpu.py` (Mosaic
               GPU, Hopper: bfloat16/float16, chunk a multiple of 64, value dim 64 or 128; features are zero-padded
               to a multiple of 64 and wider than 128 they run as feature blocks), chosen by the platform the program
               is lowered for; never falls back: a call the kernel cannot serve is a ValueError;
  "interpret"  the TPU kernels in Pallas interpret mode (how CPU tests run them);
  None         the kernel of the platform the program is lowered for (`kernels.platform.dispatch`): Pallas on tpu and
               cuda, XLA on cpu. A call a kernel cannot serve (dtype, dims, chunk) uses XLA there, logged once.
One plan per kernel call: the entry asks `tables.plan` once per backend for the call's `KernelPlan` (chunk, padded
feature width, feature block) or the reason no kernel serves it, and the driver follows the plan without checking again.
Precision: bfloat16 inputs run bfloat16 matmuls with float32 accumulation; states, normalizers and the denominator
are float32; the output has v's dtype (tolerances against float32: docs/precision.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import platform
from kernels.linear_attention.pallas import linear_attention_pallas
from kernels.linear_attention.tables import ChunkSizes, KernelPlan, check_supported, plan
from kernels.linear_attention.reference import DEFAULT_EPS, linear_attention_reference
from kernels.linear_attention.xla import linear_attention_step, linear_attention_xla

IMPLEMENTATIONS = ("reference", "xla", "pallas", "interpret", None)
OP = "linear_attention"


def _check(q, k, v, chunk_size, implementation, key_mask):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {OP} implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, length, heads, dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape, got {q.shape} and {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must match q in batch, length and heads: {v.shape[:3]} vs {q.shape[:3]}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size=}")
  if key_mask is not None and tuple(key_mask.shape) != k.shape[:2]:
    raise ValueError(f"key_mask must have shape [batch, keys] = {k.shape[:2]}, got {tuple(key_mask.shape)}")


def _plan(q, k, v, chunk_size: int, backend: platform.Backend) -> KernelPlan:
  """The one plan of this call on `backend`'s kernels (ValueError with the reason when they cannot serve it)."""
  return plan(q.shape, v.shape, jnp.result_type(q, k, v), ChunkSizes(chunk_size), backend)


def _kernels(q, k, v, *, causal, normalize, chunk_size, eps) -> dict[platform.Backend, object]:
  """Per backend: a thunk running its kernel on this call as planned, or the reason the kernel cannot serve it."""
  out: dict[platform.Backend, object] = {}
  for backend in ("tpu", "gpu"):
    try:
      planned = _plan(q, k, v, chunk_size, backend)
    except ValueError as err:
      out[backend] = str(err)
      continue
    out[backend] = (lambda p: lambda: linear_attention_pallas(  # noqa: E731  (bind the plan now)
        q, k, v, plan=p, causal=causal, normalize=normalize, eps=eps))(planned)
  return out


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, normalize: bool = True,
                     chunk_size: int = 64, implementation: str | None = None, eps: float = DEFAULT_EPS,
                     key_mask: jax.Array | None = None) -> jax.Array:
  """Linear attention on `[batch, length, heads, dim]` feature-mapped q, k and values v (see module docstring)."""
  _check(q, k, v, chunk_size, implementation, key_mask)
  if key_mask is not None:  # a padded key adds nothing to the states S and z: its feature row is zero
    k = jnp.where(key_mask.astype(bool)[:, :, None, None], k, jnp.zeros((), k.dtype))
  if implementation == "reference":
    return linear_attention_reference(q, k, v, causal=causal, normalize=normalize, eps=eps)
  if implementation == "interpret":
    return linear_attention_pallas(q, k, v, plan=_plan(q, k, v, chunk_size, "tpu"), causal=causal,
                                   normalize=normalize, eps=eps, interpret=True)
  xla = lambda: linear_attention_xla(q, k, v, causal=causal, normalize=normalize, chunk_size=chunk_size,  # noqa: E731
                                     eps=eps)
  if implementation == "xla":
    return xla()
  kernels = _kernels(q, k, v, causal=causal, normalize=normalize, chunk_size=chunk_size, eps=eps)
  if implementation == "pallas":
    return platform.require_kernel(OP, kernels=kernels)
  return platform.dispatch(OP, xla=xla, kernels=kernels)


__all__ = ["ChunkSizes", "IMPLEMENTATIONS", "KernelPlan", "check_supported", "linear_attention",
           "linear_attention_pallas", "linear_attention_reference", "linear_attention_step", "linear_attention_xla",
           "plan"]
