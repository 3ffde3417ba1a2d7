"""Linear attention: `out_t = phi(q_t)·S_t / (phi(q_t)·z_t + eps)` with `S_t = sum_s phi(k_s) v_s^T`, `z_t = sum_s phi(k_s)`.

Inputs are already feature-mapped (`q`, `k` non-negative for normalized attention); the sums run over all positions
(non-causal) or over `s <= t` (causal). Implementations:
  "reference"  the quadratic form `(q k^T) v` with a causal mask: the ground truth in tests, O(L^2) memory;
  "xla"        chunked: quadratic inside chunks of `chunk_size`, the `[D, Dv]` state carried across chunks by
               `lax.scan` (causal) or a single sum (non-causal): memory linear in length;
  "pallas"     the chunked kernels of `kernels.linear_attention_pallas` (state carried across chunks on chip,
               custom_vjp backward running the recursion in reverse) for the current backend: TPU (Mosaic TPU) or
               GPU (Mosaic GPU, Hopper; bfloat16/float16, chunk a multiple of 64, feature and value dims 64 or 128);
  "interpret"  the TPU kernels in Pallas interpret mode (how CPU tests run them).
None picks "pallas" on GPU/TPU when the call fits the kernel and "xla" otherwise (CPU included).
Accumulation is float32 whatever the input dtype; the output has the dtype of `v`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from kernels import linear_attention_pallas
from kernels.linear_attention_pallas import ChunkSizes

IMPLEMENTATIONS = ("reference", "xla", "pallas", "interpret", None)
DEFAULT_EPS = 1e-6


def _check(q, k, v, chunk_size, implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown linear_attention implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, length, heads, dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape, got {q.shape} and {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must match q in batch, length and heads: {v.shape[:3]} vs {q.shape[:3]}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size=}")


def linear_attention_reference(q_BxLxHxF: jax.Array, k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array, *, causal: bool,
                               normalize: bool = True, eps: float = DEFAULT_EPS) -> jax.Array:
  """The quadratic form: `A = q k^T` (lower-triangular if causal), `out = A v / (A 1 + eps)`."""
  f32 = jnp.float32
  scores_BxHxLxL = jnp.einsum("blhf,bshf->bhls", q_BxLxHxF.astype(f32), k_BxLxHxF.astype(f32))
  if causal:
    length = q_BxLxHxF.shape[1]
    scores_BxHxLxL = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores_BxHxLxL, 0.0)
  out = jnp.einsum("bhls,bshd->blhd", scores_BxHxLxL, v_BxLxHxD.astype(f32))
  if normalize:
    out = out / (jnp.einsum("bhls->blh", scores_BxHxLxL)[..., None] + eps)
  return out.astype(v_BxLxHxD.dtype)


def _pad_to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
  # Zero rows add nothing to the state or the normalizer; their outputs are sliced off.
  pad = -x.shape[1] % chunk_size
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def linear_attention_xla(q_BxLxHxF: jax.Array, k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array, *, causal: bool,
                         normalize: bool = True, chunk_size: int = 64, eps: float = DEFAULT_EPS) -> jax.Array:
  """Chunked linear attention; memory grows linearly with length."""
  f32 = jnp.float32
  b, length, h, _ = q_BxLxHxF.shape
  q, k, v = (x.astype(f32) for x in (q_BxLxHxF, k_BxLxHxF, v_BxLxHxD))
  if not causal:
    # Every query sees the same state: one sum over the sequence, no [L, L] scores at all.
    state_BxHxFxD = jnp.einsum("blhf,blhd->bhfd", k, v)
    out = jnp.einsum("blhf,bhfd->blhd", q, state_BxHxFxD)
    if normalize:
      out = out / (jnp.einsum("blhf,bhf->blh", q, jnp.sum(k, axis=1))[..., None] + eps)
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
    scores_BxHxCxC = jnp.where(tril_CxC, jnp.einsum("bchf,bshf->bhcs", q_c, k_c), 0.0)
    out = jnp.einsum("bhcs,bshd->bchd", scores_BxHxCxC, v_c) + jnp.einsum("bchf,bhfd->bchd", q_c, state_BxHxFxD)
    den = jnp.einsum("bhcs->bch", scores_BxHxCxC) + jnp.einsum("bchf,bhf->bch", q_c, norm_BxHxF)
    carry = (state_BxHxFxD + jnp.einsum("bchf,bchd->bhfd", k_c, v_c), norm_BxHxF + jnp.sum(k_c, axis=1))
    return carry, (out, den)

  init = (jnp.zeros((b, h, q.shape[-1], v.shape[-1]), f32), jnp.zeros((b, h, q.shape[-1]), f32))
  _, (out, den) = jax.lax.scan(step, init, (to_chunks(q), to_chunks(k), to_chunks(v)))
  if normalize:
    out = out / (den[..., None] + eps)
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, h, v.shape[-1])[:, :length]
  return out.astype(v_BxLxHxD.dtype)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, normalize: bool = True,
                     chunk_size: int = 64, implementation: str | None = None, eps: float = DEFAULT_EPS) -> jax.Array:
  """Linear attention on `[batch, length, heads, dim]` feature-mapped q, k and values v (see module docstring)."""
  _check(q, k, v, chunk_size, implementation)
  backend = linear_attention_pallas.accelerator_backend()
  if implementation == "pallas" and backend is None:
    raise ValueError(f"linear_attention implementation='pallas' needs a GPU or TPU backend, got "
                     f"{jax.default_backend()!r}; use implementation='interpret' to run the kernels on CPU")
  if implementation is None and backend is not None:
    try:
      linear_attention_pallas.check_supported(q.shape, v.shape, jnp.result_type(q, k, v), chunk_size, backend)
      implementation = "pallas"
    except ValueError:
      implementation = "xla"
  if implementation in ("pallas", "interpret"):
    return linear_attention_pallas.linear_attention_pallas(
        q, k, v, causal=causal, normalize=normalize, eps=eps, chunk_sizes=ChunkSizes(chunk_size),
        backend="tpu" if implementation == "interpret" else backend, interpret=implementation == "interpret")
  if implementation == "reference":
    return linear_attention_reference(q, k, v, causal=causal, normalize=normalize, eps=eps)
  return linear_attention_xla(q, k, v, causal=causal, normalize=normalize, chunk_size=chunk_size, eps=eps)


def linear_attention_step(state: tuple[jax.Array, jax.Array], q_BxHxF: jax.Array, k_BxHxF: jax.Array,
                          v_BxHxD: jax.Array, *, normalize: bool = True, eps: float = DEFAULT_EPS):
  """One causal decoding step: adds `(k_t, v_t)` to the state `(S [B,H,F,D], z [B,H,F])` and reads it with `q_t`.

  Returns `(new_state, out [B, H, D])`; the state size does not depend on the sequence length.
  """
  f32 = jnp.float32
  state_BxHxFxD, norm_BxHxF = state
  q, k, v = q_BxHxF.astype(f32), k_BxHxF.astype(f32), v_BxHxD.astype(f32)
  state_BxHxFxD = state_BxHxFxD + jnp.einsum("bhf,bhd->bhfd", k, v)
  norm_BxHxF = norm_BxHxF + k
  out = jnp.einsum("bhf,bhfd->bhd", q, state_BxHxFxD)
  if normalize:
    out = out / (jnp.einsum("bhf,bhf->bh", q, norm_BxHxF)[..., None] + eps)
  return (state_BxHxFxD, norm_BxHxF), out.astype(v_BxHxD.dtype)


__all__ = ["linear_attention", "linear_attention_reference", "linear_attention_step", "linear_attention_xla"]
