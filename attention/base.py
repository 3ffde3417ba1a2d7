"""Shared pieces of every attention layer: common options, projections and argument checks.

Every variant subclasses `AttentionLayer`, so the common options (`num_heads`, `qkv_dim`, `causal`, `dropout_rate`,
`decode`) and the projection submodule names (`query`, `key`, `value`, `out`, as in
`flax.linen.MultiHeadDotProductAttention`) are the same everywhere; one parameter tree can then be applied by
related variants.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

# LRA's initialisation for attention projections.
default_kernel_init = nn.initializers.xavier_uniform()


class AttentionLayer(nn.Module):
  """Base class: `y = layer(x, mask=None, deterministic=True)` with `x: [batch, length, features]`.

  Attributes:
    num_heads: number of heads; must divide `qkv_dim`.
    qkv_dim: total query/key/value width over all heads; None means the input width.
    causal: position t attends only to positions <= t.
    dropout_rate: dropout on attention weights (or the variant's mixing weights).
    decode: autoregressive decoding with a flax `cache` collection (requires `causal=True`).
  """

  num_heads: int = 8
  qkv_dim: int | None = None
  causal: bool = False
  dropout_rate: float = 0.0
  decode: bool = False

  # Variants that cannot be causal / cannot decode set these to False and say why.
  supports_causal: ClassVar[bool] = True
  supports_decode: ClassVar[bool] = False
  not_causal_reason: ClassVar[str] = ""

  def check_inputs(self, x: jax.Array, mask: jax.Array | None) -> None:
    """Validates shapes and options; errors name the value and what was expected."""
    name = type(self).__name__
    if self.causal and not self.supports_causal:
      raise ValueError(f"{name} cannot be causal (causal=True was given): {self.not_causal_reason}")
    if self.decode and not self.supports_decode:
      raise ValueError(f"{name} has no decode path (decode=True was given); use a variant that supports decoding")
    if self.decode and not self.causal:
      raise ValueError(f"{name}: decode=True requires causal=True")
    if x.ndim != 3:
      raise ValueError(f"{name} expects x of shape [batch, length, features], got shape {x.shape}")
    if mask is not None and (mask.shape != x.shape[:2]):
      raise ValueError(f"{name}: mask must have shape [batch, length] = {x.shape[:2]}, got {mask.shape}")
    if self.num_heads < 1:
      raise ValueError(f"{name}: num_heads must be >= 1, got {self.num_heads}")
    qkv_dim = self.qkv_dim or x.shape[-1]
    if qkv_dim % self.num_heads:
      raise ValueError(f"{name}: qkv_dim={qkv_dim} must be a multiple of num_heads={self.num_heads}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"{name}: dropout_rate must be in [0, 1), got {self.dropout_rate}")

  def head_dim(self, x: jax.Array) -> int:
    return (self.qkv_dim or x.shape[-1]) // self.num_heads

  def project(self, x: jax.Array, name: str) -> jax.Array:
    """Projects `[B, L, F]` to `[B, L, H, D]` with the shared submodule `name` (query / key / value)."""
    return nn.DenseGeneral(features=(self.num_heads, self.head_dim(x)), axis=-1, kernel_init=default_kernel_init,
                           name=name)(x)

  def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return self.project(x, "query"), self.project(x, "key"), self.project(x, "value")

  def project_out(self, y_BxLxHxD: jax.Array, features: int) -> jax.Array:
    """Merges heads and projects back to the model width with the shared submodule `out`."""
    return nn.DenseGeneral(features=features, axis=(-2, -1), kernel_init=default_kernel_init, name="out")(y_BxLxHxD)


def causal_mask(q_len: int, k_len: int) -> jax.Array:
  """`[q_len, k_len]` bool, True where key position <= query position (queries aligned to the last keys)."""
  offset = k_len - q_len
  return jnp.arange(q_len)[:, None] + offset >= jnp.arange(k_len)[None, :]
