"""The quadratic form of linear attention: the ground truth in tests (float32 throughout, O(L^2) memory)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_EPS = 1e-6


def linear_attention_reference(q_BxLxHxF: jax.Array, k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array, *, causal: bool,
                               normalize: bool = True, eps: float = DEFAULT_EPS) -> jax.Array:
  """`A = q k^T` (lower-triangular if causal), `out = A v / (A 1 + eps)`; float32 inside, output in v's dtype."""
  f32 = jnp.float32
  scores_BxHxLxL = jnp.einsum("blhf,bshf->bhls", q_BxLxHxF.astype(f32), k_BxLxHxF.astype(f32))
  if causal:
    length = q_BxLxHxF.shape[1]
    scores_BxHxLxL = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores_BxHxLxL, 0.0)
  out = jnp.einsum("bhls,bshd->blhd", scores_BxHxLxL, v_BxLxHxD.astype(f32))
  if normalize:
    out = out / (jnp.einsum("bhls->blh", scores_BxHxLxL)[..., None] + eps)
  return out.astype(v_BxLxHxD.dtype)


__all__ = ["DEFAULT_EPS", "linear_attention_reference"]
