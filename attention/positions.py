"""Relative positions inside attention layers: rotary embeddings (RoPE) and linear biases (ALiBi).

The encoder decides the positional encoding (`config.model.pos_encoding`); for "rope" and "alibi" it adds nothing to
the embeddings and sets the common layer field `AttentionLayer.positions` instead, and the layer applies it here:

* RoPE (Su et al., 2021, "RoFormer"): queries and keys are rotated pairwise, feature pair (2i, 2i+1) of position p by
  the angle `p * 10000^(-2i/D)`, so `rope(q, p) . rope(k, s)` depends on `p - s` only.
* ALiBi (Press et al., 2022, "Train Short, Test Long"): the score of query i and key j gets `-slope_h * |i - j|` (on
  the allowed keys of a causal layer this is `-slope_h * (i - j)`), with head slopes the geometric sequence of the
  paper. Layers that compute their own scores add `alibi_bias`; the softmax layer hands the slopes to its core.

Neither has a table bounded by a maximum length: both are functions of the positions, so a layer evaluates and
decodes at any length. `decode_offset` gives a decode step its position from the layer's ring cache.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention import ranges as ranges_lib

# What `AttentionLayer.positions` may be: "none" (the encoder added absolute positions, or none at all).
LAYER_POSITIONS = ("none", "rope", "alibi")
ROPE_BASE = 10_000.0


def _rope_widths(num_heads: int, positions: str) -> ranges_lib.Range | None:
  if positions != "rope" or not isinstance(num_heads, int) or num_heads < 1:
    return None
  return ranges_lib.Integer(1, multiple_of=2 * num_heads)


# RoPE rotates feature pairs, so a head's width `qkv_dim / num_heads` is even: a constraint of the model-owned options
# that the gate checks when the layer is built and the config check before any tracing (attention/specs.py). `rope`
# keeps its own shape check for a layer whose `qkv_dim` is the input's width (None), which only a call knows.
ROPE_HEAD_DIM = ranges_lib.Constraint(
    "qkv_dim", ("num_heads", "positions"), _rope_widths,
    why="rope rotates feature pairs, so head_dim = qkv_dim / num_heads must be even; choose qkv_dim a multiple of "
        "2 * num_heads")


def rope(x_BxLxHxD: jax.Array, offset: jax.Array | int = 0, *, base: float = ROPE_BASE) -> jax.Array:
  """Rotates feature pairs (2i, 2i+1) of position `offset + l` by `(offset + l) * base^(-2i/D)` (D must be even).

  Angles and the rotation are computed in float32 (positions in the thousands lose their fraction in bfloat16); the
  result has the input's dtype.
  """
  length, head_dim = x_BxLxHxD.shape[1], x_BxLxHxD.shape[-1]
  if head_dim % 2:  # a shape check: a layer's qkv_dim, when set, passed the gate (ROPE_HEAD_DIM)
    raise ValueError(f"rope rotates feature pairs: head_dim={head_dim} must be even; choose qkv_dim / num_heads even")
  inv_freq_D2 = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  position_L = jnp.arange(length, dtype=jnp.float32) + jnp.asarray(offset, jnp.float32)
  angle_LxD2 = position_L[:, None] * inv_freq_D2[None, :]
  cos, sin = jnp.cos(angle_LxD2)[None, :, None, :], jnp.sin(angle_LxD2)[None, :, None, :]
  x = x_BxLxHxD.astype(jnp.float32)
  even, odd = x[..., 0::2], x[..., 1::2]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x_BxLxHxD.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """The ALiBi paper's head slopes, float32 `[num_heads]`: `2^(-8 h / n)` for h = 1..n when n is a power of two;
  otherwise the slopes of the next lower power of two followed by every other slope of the next higher one."""
  def power_of_two(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (h + 1) for h in range(n)]

  if num_heads < 1:
    raise ValueError(f"alibi_slopes: num_heads must be >= 1, got {num_heads}")
  lower = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = power_of_two(lower)
  if lower < num_heads:
    slopes += power_of_two(2 * lower)[0::2][:num_heads - lower]
  return np.asarray(slopes, np.float32)


def alibi_bias(slopes_H: jax.Array, query_positions_L: jax.Array, key_positions_S: jax.Array) -> jax.Array:
  """float32 `[1, H, L, S]` bias `-slope_h * |i - j|` for query positions i and key positions j."""
  distance_LxS = jnp.abs(query_positions_L[:, None].astype(jnp.float32) - key_positions_S[None, :].astype(jnp.float32))
  return -jnp.asarray(slopes_H, jnp.float32)[None, :, None, None] * distance_LxS[None, None]


def decode_offset(layer: nn.Module, prefix: str) -> jax.Array:
  """The position of the current decode step: the index of `layer`'s ring cache `prefix` (0 before `init` made it).

  Read before `AttentionLayer.ring_cache` advances it, so queries and keys can be rotated before they are cached.
  """
  if not layer.has_variable("cache", f"{prefix}_index"):
    return jnp.array(0, jnp.int32)
  return layer.get_variable("cache", f"{prefix}_index")


def check_positions(layer_name: str, positions: str, supported: tuple[str, ...]) -> None:
  """One-line ValueError when a variant cannot take the positional encoding `positions`."""
  if positions not in LAYER_POSITIONS:
    raise ValueError(f"{layer_name}: unknown positions {positions!r}; valid choices: {LAYER_POSITIONS}")
  if positions not in supported:
    raise ValueError(f"attention {layer_name} cannot take pos_encoding={positions!r} (it supports "
                     f"{', '.join(repr(s) for s in supported)} inside the layer); choose another "
                     f"config.model.pos_encoding or another attention variant")
