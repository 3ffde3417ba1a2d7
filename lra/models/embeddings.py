"""Token embeddings and positional encodings."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


POSITIONAL_ENCODINGS = ("learned", "sinusoidal", "none")


def sinusoidal_table(max_length: int, features: int, max_scale: float = 10_000.0) -> np.ndarray:
  """`[max_length, features]` sin/cos table of Vaswani et al. (first half sin, second half cos)."""
  position = np.arange(max_length, dtype=np.float32)[:, None]
  half = features // 2
  div_term = np.exp(np.arange(half, dtype=np.float32) * -(math.log(max_scale) / max(half - 1, 1)))
  table = np.zeros((max_length, features), np.float32)
  table[:, :half] = np.sin(position * div_term)
  table[:, half:2 * half] = np.cos(position * div_term)
  return table


class PositionalEncoding(nn.Module):
  """Adds a positional encoding to `[B, L, F]` inputs: learned, sinusoidal or none.

  `decode_position` (a scalar) offsets a length-1 input during autoregressive decoding.
  """

  kind: str = "learned"
  max_length: int = 512

  @nn.compact
  def __call__(self, x_BxLxF: jax.Array, decode_position: jax.Array | None = None) -> jax.Array:
    if self.kind not in POSITIONAL_ENCODINGS:
      raise ValueError(f"unknown positional encoding {self.kind!r}; valid choices: {POSITIONAL_ENCODINGS}")
    length, features = x_BxLxF.shape[1:]
    if length > self.max_length:
      raise ValueError(f"sequence length {length} exceeds the positional encoding's max_length={self.max_length}; "
                       f"raise config.data.max_length / the model's max_length")
    if self.kind == "none":
      return x_BxLxF
    if self.kind == "learned":
      table = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (self.max_length, features))
    else:
      table = jnp.asarray(sinusoidal_table(self.max_length, features))
    if decode_position is None:
      pos = table[:length]
    else:
      pos = jax.lax.dynamic_slice_in_dim(table, decode_position, length, axis=0)
    return x_BxLxF + pos[None].astype(x_BxLxF.dtype)
