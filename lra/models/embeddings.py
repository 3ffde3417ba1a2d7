"""Token embeddings and positional encodings (`config.model.pos_encoding`).

* "learned": a trained `[max_length, F]` table added to the embeddings; the only encoding bounded by `max_length`.
* "sinusoidal": Vaswani et al. (2017), section 3.5, exactly: `PE(pos, 2i) = sin(pos / 10000^(2i/F))`,
  `PE(pos, 2i+1) = cos(pos / 10000^(2i/F))` (sines and cosines interleaved), added to the embeddings.
* "lra_sinusoidal": the table of the LRA code (flax's old `sinusoidal_init`): first half sines, second half cosines,
  frequencies `10000^(-i / (F/2 - 1))`. Not the paper's formula; kept under its own name to reproduce LRA's configs.
* "rope", "alibi": relative positions applied inside every attention layer (`attention.positions`): the encoder adds
  nothing and sets the layers' `positions` field; a variant that cannot take them refuses naming both.
* "none": no positions.

The sinusoids are functions of the position, computed for the positions in use, so they evaluate and decode at any
length.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Encodings applied inside the attention layers, by the name of `AttentionLayer.positions`.
LAYER_ENCODINGS = {"rope": "rope", "alibi": "alibi"}
POSITIONAL_ENCODINGS = ("learned", "sinusoidal", "lra_sinusoidal", *LAYER_ENCODINGS, "none")
BOUNDED_ENCODINGS = ("learned",)  # the encodings whose table ends at max_length


def layer_positions(pos_encoding: str) -> str:
  """What the encoder sets as `AttentionLayer.positions` for `pos_encoding` ("none" for additive encodings)."""
  return LAYER_ENCODINGS.get(pos_encoding, "none")


def vaswani_sinusoids(positions_L: jax.Array | np.ndarray, features: int, max_scale: float = 10_000.0) -> jax.Array:
  """float32 `[L, features]`: `PE(pos, 2i) = sin(pos / max_scale^(2i/features))`, `PE(pos, 2i+1) = cos(...)`."""
  two_i = jnp.arange(0, features, 2, dtype=jnp.float32)
  angle_LxI = jnp.asarray(positions_L, jnp.float32)[:, None] / max_scale ** (two_i / features)[None, :]
  table = jnp.stack([jnp.sin(angle_LxI), jnp.cos(angle_LxI)], axis=-1).reshape(angle_LxI.shape[0], -1)
  return table[:, :features]


def lra_sinusoids(positions_L: jax.Array | np.ndarray, features: int, max_scale: float = 10_000.0) -> jax.Array:
  """float32 `[L, features]`: LRA's table (first half sin, second half cos, frequencies `max_scale^(-i/(F/2-1))`,
  a zero last column when `features` is odd)."""
  half = features // 2
  div_term = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(max_scale) / max(half - 1, 1)))
  angle_LxH = jnp.asarray(positions_L, jnp.float32)[:, None] * div_term[None, :]
  table = jnp.concatenate([jnp.sin(angle_LxH), jnp.cos(angle_LxH)], axis=-1)
  return jnp.pad(table, ((0, 0), (0, features - 2 * half)))


SINUSOIDS = {"sinusoidal": vaswani_sinusoids, "lra_sinusoidal": lra_sinusoids}


def sinusoidal_table(max_length: int, features: int, max_scale: float = 10_000.0) -> np.ndarray:
  """`[max_length, features]` table of Vaswani et al. (interleaved sin/cos), as numpy."""
  return np.asarray(vaswani_sinusoids(np.arange(max_length), features, max_scale))


def lra_sinusoidal_table(max_length: int, features: int, max_scale: float = 10_000.0) -> np.ndarray:
  """`[max_length, features]` table of the LRA code (first half sin, second half cos), as numpy."""
  return np.asarray(lra_sinusoids(np.arange(max_length), features, max_scale))


def check_length(pos_encoding: str, length: int, max_length: int) -> None:
  """One-line ValueError when `pos_encoding` cannot encode `length` positions (only "learned" is bounded)."""
  if pos_encoding in BOUNDED_ENCODINGS and length > max_length:
    raise ValueError(f"sequence length {length} exceeds max_length={max_length} of pos_encoding={pos_encoding!r} "
                     f"(a learned table has no rows beyond it); train at that length, or use an encoding that "
                     f"extrapolates ({', '.join(e for e in POSITIONAL_ENCODINGS if e not in BOUNDED_ENCODINGS)})")


class PositionalEncoding(nn.Module):
  """Adds a positional encoding to `[B, L, F]` inputs (module docstring); "rope", "alibi" and "none" add nothing.

  `decode_position` (a scalar) offsets a length-1 input during autoregressive decoding.
  """

  kind: str = "learned"
  max_length: int = 512

  @nn.compact
  def __call__(self, x_BxLxF: jax.Array, decode_position: jax.Array | None = None) -> jax.Array:
    if self.kind not in POSITIONAL_ENCODINGS:
      raise ValueError(f"unknown positional encoding {self.kind!r}; valid choices: {POSITIONAL_ENCODINGS}")
    length, features = x_BxLxF.shape[1:]
    check_length(self.kind, length, self.max_length)
    if self.kind == "none" or self.kind in LAYER_ENCODINGS:
      return x_BxLxF
    offset = 0 if decode_position is None else decode_position
    if self.kind == "learned":
      table = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (self.max_length, features))
      pos = table[:length] if decode_position is None else jax.lax.dynamic_slice_in_dim(table, offset, length, axis=0)
    else:
      pos = SINUSOIDS[self.kind](offset + jnp.arange(length), features)
    return x_BxLxF + pos[None].astype(x_BxLxF.dtype)
