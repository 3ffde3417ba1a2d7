"""Grassmann flow mixing (Zhang, 2025, "Attention Is Not What You Need", arXiv 2512.19428, Section 3.2): an
attention-free token mixer built from Plücker coordinates of pairs of reduced states.

For each position t:
  z_t = W_red h_t                                   (reduce to r dims, default 32)
  for each offset d in `offsets` whose partner s is valid:
    p_ij(t, s) = z_t,i z_s,j - z_t,j z_s,i  (i < j)   the Plücker coordinates of span(z_t, z_s), C(r, 2) of them
    p_hat = p / max(|p|, eps)                         (option `normalize`)
  g_t = W_p mean_d(p_hat) + b                       (one shared projection back to the model width)
  a_t = sigmoid(W_g [h_t; g_t])
  out_t = a_t * h_t + (1 - a_t) * g_t
Averaging the normalized coordinates before the shared projection equals averaging the projected offsets (the map is
affine), and costs one projection instead of one per offset: the cost is linear in length.

Direction: the paper pairs t with s = t + d while calling the model causal, which lets position t read the future.
Here `causal=True` pairs t with s = t - d only (past offsets); `causal=False` uses both s = t - d and s = t + d.
Partners that are padding or outside the sequence are left out of the average; a position with no valid partner
gets g_t = 0. Decoding keeps the last max(offsets) reduced states (a fixed-size cache).

`num_heads`, `qkv_dim` and `dropout_rate` are accepted for the common interface; the mixer has no heads or weights to
drop. The paper's post-LN blocks are the encoder option `config.model.post_ln=True`; a per-layer offset schedule is
`config.model.layer_options` (e.g. `({"offsets": (1, 2)}, {"offsets": (4, 8)})`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention.base import AttentionLayer
from attention.registry import register


def plucker_coordinates(u_Nxr: jax.Array, v_Nxr: jax.Array) -> jax.Array:
  """`p_ij = u_i v_j - u_j v_i` for i < j (row-major order of `np.triu_indices(r, 1)`): `[..., r(r-1)/2]`."""
  i, j = np.triu_indices(u_Nxr.shape[-1], 1)
  return u_Nxr[..., i] * v_Nxr[..., j] - u_Nxr[..., j] * v_Nxr[..., i]


def _normalized(p: jax.Array, normalize: bool, eps: float) -> jax.Array:
  if not normalize:
    return p
  # max(|p|, eps) written as sqrt(max(|p|^2, eps^2)): same value, finite gradient at p = 0.
  return p / jnp.sqrt(jnp.maximum(jnp.sum(p * p, axis=-1, keepdims=True), eps * eps))


def _shift(x_BxLx: jax.Array, offset: int, fill) -> jax.Array:
  """`out[:, t] = x[:, t - offset]` (offset may be negative), `fill` where t - offset is outside the sequence."""
  length = x_BxLx.shape[1]
  if abs(offset) >= length:
    return jnp.full_like(x_BxLx, fill)
  pad = [(0, 0)] * x_BxLx.ndim
  if offset > 0:
    pad[1] = (offset, 0)
    return jnp.pad(x_BxLx, pad, constant_values=fill)[:, :length]
  pad[1] = (0, -offset)
  return jnp.pad(x_BxLx, pad, constant_values=fill)[:, -offset:]


@register("grassmann")
class GrassmannFlow(AttentionLayer):
  """Attributes: reduced_dim (r), offsets, normalize (divide the Plücker vector by its norm), eps."""

  reduced_dim: int = 32
  offsets: tuple[int, ...] = (1, 2, 4, 8, 12, 16)
  normalize: bool = True
  eps: float = 1e-6

  supports_decode = True

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    offsets = tuple(int(o) for o in self.offsets)
    if not offsets or min(offsets) < 1:
      raise ValueError(f"offsets must be a non-empty tuple of positive integers, got {self.offsets}")
    if self.reduced_dim < 2:
      raise ValueError(f"reduced_dim must be >= 2 (Plücker coordinates need a pair of axes), got {self.reduced_dim}")
    b, length, features = x.shape
    z = nn.Dense(self.reduced_dim, name="reduce")(x).astype(jnp.float32)
    valid = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)

    if self.decode and self.has_variable("cache", "history"):
      p_sum, count = self._decode_step(z, valid)
    else:
      if self.decode:
        self._cache(b, z.dtype)
      directions = (1,) if self.causal else (1, -1)
      p_sum = jnp.zeros((b, length, self.reduced_dim * (self.reduced_dim - 1) // 2), jnp.float32)
      count = jnp.zeros((b, length, 1), jnp.float32)
      for offset in offsets:
        for direction in directions:
          partner_z = _shift(z, direction * offset, 0.0)
          partner_ok = _shift(valid, direction * offset, False)[..., None]
          p_hat = _normalized(plucker_coordinates(z, partner_z), self.normalize, self.eps)
          p_sum = p_sum + jnp.where(partner_ok, p_hat, 0.0)
          count = count + partner_ok
    has_partner = count > 0
    p_mean = p_sum / jnp.maximum(count, 1.0)
    g = jnp.where(has_partner, nn.Dense(features, name="project")(p_mean.astype(x.dtype)), 0.0)
    gate = jax.nn.sigmoid(nn.Dense(features, name="gate")(jnp.concatenate([x, g.astype(x.dtype)], axis=-1)))
    return (gate * x + (1.0 - gate) * g).astype(x.dtype)

  def _cache(self, batch: int, dtype):
    window = max(self.offsets)
    return (self.variable("cache", "history", jnp.zeros, (batch, window, self.reduced_dim), dtype),
            self.variable("cache", "history_valid", jnp.zeros, (batch, window), bool),
            self.variable("cache", "index", lambda: jnp.array(0, jnp.int32)))

  def _decode_step(self, z_Bx1xr: jax.Array, valid_Bx1: jax.Array):
    """Ring buffer of the last max(offsets) reduced states: slot (t mod W) holds position t."""
    if z_Bx1xr.shape[1] != 1:
      raise ValueError(f"decode step expects one position per call, got length {z_Bx1xr.shape[1]}")
    history, history_valid, index = self._cache(z_Bx1xr.shape[0], z_Bx1xr.dtype)
    window = history.value.shape[1]
    t = index.value
    p_sum = jnp.zeros((z_Bx1xr.shape[0], 1, self.reduced_dim * (self.reduced_dim - 1) // 2), jnp.float32)
    count = jnp.zeros((z_Bx1xr.shape[0], 1, 1), jnp.float32)
    for offset in self.offsets:
      slot = (t - offset) % window
      partner_z = jax.lax.dynamic_slice_in_dim(history.value, slot, 1, axis=1)
      partner_ok = (jax.lax.dynamic_slice_in_dim(history_valid.value, slot, 1, axis=1) & (t - offset >= 0))[..., None]
      p_hat = _normalized(plucker_coordinates(z_Bx1xr, partner_z), self.normalize, self.eps)
      p_sum = p_sum + jnp.where(partner_ok, p_hat, 0.0)
      count = count + partner_ok
    history.value = jax.lax.dynamic_update_slice_in_dim(history.value, z_Bx1xr, t % window, axis=1)
    history_valid.value = jax.lax.dynamic_update_slice_in_dim(history_valid.value, valid_Bx1, t % window, axis=1)
    index.value = t + 1
    return p_sum, count
