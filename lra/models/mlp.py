"""The position-wise MLP of the encoder blocks."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> dropout -> Dense(out)."""

  mlp_dim: int
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    features = x.shape[-1]
    dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,  # noqa: E731
                                     param_dtype=jnp.float32, name=name)
    y = nn.gelu(dense(self.mlp_dim, "wi")(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return dense(features, "wo")(y)
