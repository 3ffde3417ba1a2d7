"""The position-wise MLP of the encoder blocks."""

from __future__ import annotations

import flax.linen as nn
import jax


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> dropout -> Dense(out)."""

  mlp_dim: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    features = x.shape[-1]
    y = nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform(), name="wi")(x)
    y = nn.gelu(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return nn.Dense(features, kernel_init=nn.initializers.xavier_uniform(), name="wo")(y)
