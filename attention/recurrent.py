"""Shared machinery of the recurrent (linear-attention) family: masking, the parallel kernel call, and the decode
cache holding a fixed-size state `(S [B, H, F, D], z [B, H, F])`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels.linear_attention import linear_attention, linear_attention_step


def mask_keys(phi_k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array, mask_BxL: jax.Array | None):
  """Zeroes padded keys' features and values: they then add nothing to the state or the normalizer."""
  if mask_BxL is None:
    return phi_k_BxLxHxF, v_BxLxHxD
  m = mask_BxL[:, :, None, None]
  return jnp.where(m, phi_k_BxLxHxF, 0), jnp.where(m, v_BxLxHxD, 0)


def linear_mix(module: nn.Module, phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
               causal: bool, normalize: bool, chunk_size: int, implementation: str | None,
               decode: bool, eps: float = 1e-6) -> jax.Array:
  """Linear attention of feature-mapped `phi_q`, `phi_k` over `v` (`[B, L, H, *]`), parallel or one decode step.

  In decode mode the state lives in `module`'s `cache` collection (`linear_state`, `linear_norm`), allocated by
  `init` and advanced by each length-1 call.
  """
  phi_k, v = mask_keys(phi_k, v, mask)
  if not decode:
    return linear_attention(phi_q, phi_k, v, causal=causal, normalize=normalize, chunk_size=chunk_size,
                            implementation=implementation, eps=eps)
  b, length, h, f = phi_q.shape
  initialized = module.has_variable("cache", "linear_state")
  state = module.variable("cache", "linear_state", jnp.zeros, (b, h, f, v.shape[-1]), jnp.float32)
  norm = module.variable("cache", "linear_norm", jnp.zeros, (b, h, f), jnp.float32)
  if not initialized:  # init: the parallel causal output, the cache stays empty
    return linear_attention(phi_q, phi_k, v, causal=True, normalize=normalize, chunk_size=chunk_size,
                            implementation=implementation, eps=eps)
  if length != 1:
    raise ValueError(f"decode step expects one position per call, got length {length}")
  (state.value, norm.value), out = linear_attention_step((state.value, norm.value), phi_q[:, 0], phi_k[:, 0],
                                                         v[:, 0], normalize=normalize, eps=eps)
  return out[:, None]
