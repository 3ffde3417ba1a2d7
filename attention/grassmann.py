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

Options beyond the paper's code (the defaults reproduce it):
- `gate_input`: "hidden_and_geometry" (the code: `sigmoid(W_g [h_t; g_t])`) or "geometry" (the review's G(g):
  `sigmoid(W_g g_t)`).
- `mixing`: "mean" (the code: a plain mean over the valid partners) or "learned": a learned logit per signed offset
  (`offset_logits`, `[directions, offsets]`, zeros at init), softmax-normalized over the partners that are valid at
  each position (so it starts as the mean and stays a convex combination at edges and next to padding).
- `use_plucker=False` (ablation): the pair feature is the partner's reduced state z_s instead of the Plücker
  coordinates of (z_t, z_s) (normalized the same way), so the layer mixes neighbours without the Grassmann lift.
- `use_gate=False` (ablation): `out_t = h_t + g_t`, the geometric features added without a gate.

Direction: the paper pairs t with s = t + d while calling the model causal, which lets position t read the future.
Here `causal=True` pairs t with s = t - d only (past offsets); `causal=False` uses both s = t - d and s = t + d.
Partners that are padding or outside the sequence are left out of the average; a position with no valid partner
gets g_t = 0. Decoding keeps the last max(offsets) reduced states (a fixed-size ring cache).

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
from attention.ranges import Integer, OneOf, Real, Satisfies


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


GATE_INPUTS = ("hidden_and_geometry", "geometry")
MIXINGS = ("mean", "learned")


@register("grassmann")
class GrassmannFlow(AttentionLayer):
  """Attributes: reduced_dim (r), offsets, normalize (divide the pair feature by its norm), eps, gate_input
  ("hidden_and_geometry" | "geometry"), mixing ("mean" | "learned"), use_plucker, use_gate (see the module
  docstring)."""

  reduced_dim: int = 32
  offsets: tuple[int, ...] = (1, 2, 4, 8, 12, 16)
  normalize: bool = True
  eps: float = 1e-6
  gate_input: str = "hidden_and_geometry"
  mixing: str = "mean"
  use_plucker: bool = True
  use_gate: bool = True
  option_ranges = {"reduced_dim": Integer(2), "eps": Real(0.0, lo_open=True), "gate_input": OneOf(GATE_INPUTS),
                   "mixing": OneOf(MIXINGS),
                   "offsets": Satisfies(lambda o: len(o) > 0 and all(int(d) == d and d >= 1 for d in o),
                                        "a non-empty tuple of positive integers")}

  supports_decode = True
  fixed_size_cache = True

  def sequence_parallel_form(self) -> str | None:
    # No keys: the offsets' shifts of a sequence-sharded input become GSPMD collective-permutes of the
    # max(offsets) boundary positions (the halo of its largest offset).
    return "halo"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    offsets = tuple(int(o) for o in self.offsets)
    b, length, features = x.shape
    x = x.astype(self.compute_dtype)
    dense = lambda n, name: nn.Dense(n, dtype=self.compute_dtype, param_dtype=jnp.float32, name=name)  # noqa: E731
    z = dense(self.reduced_dim, "reduce")(x).astype(jnp.float32)  # Plücker products and norms in float32
    valid = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)

    directions = (1,) if self.causal else (1, -1)
    # Partner weights: 1 (mean) or exp(logit - max logit) (learned; dividing by the valid partners' sum below makes
    # it the softmax over those partners).
    if self.mixing == "learned":
      logits = self.param("offset_logits", nn.initializers.zeros, (len(directions), len(offsets)), jnp.float32)
      weights = jnp.exp(logits - jnp.max(logits))
    else:
      weights = jnp.ones((len(directions), len(offsets)), jnp.float32)

    # Decoding keeps the last max(offsets) reduced states (plus the current one) in a ring cache.
    step = self.ring_cache("history", max(offsets) + 1, {"z": z}, mask) if self.decode else None
    if step is not None:
      p_sum, count = self._decode_step(z, *step, weights[0])
    else:
      p_sum = jnp.zeros((b, length, self._pair_dim), jnp.float32)
      count = jnp.zeros((b, length, 1), jnp.float32)
      for i, offset in enumerate(offsets):
        for d, direction in enumerate(directions):
          partner_z = _shift(z, direction * offset, 0.0)
          partner_ok = _shift(valid, direction * offset, False)[..., None]
          p_sum = p_sum + jnp.where(partner_ok, weights[d, i] * self._pair_feature(z, partner_z), 0.0)
          count = count + jnp.where(partner_ok, weights[d, i], 0.0)
    has_partner = count > 0
    p_mean = p_sum / jnp.where(has_partner, count, 1.0)
    g = jnp.where(has_partner, dense(features, "project")(p_mean), 0.0).astype(x.dtype)
    if not self.use_gate:
      return (x + g).astype(x.dtype)
    gate_in = g if self.gate_input == "geometry" else jnp.concatenate([x, g], axis=-1)
    gate = jax.nn.sigmoid(dense(features, "gate")(gate_in))
    return (gate * x + (1.0 - gate) * g).astype(x.dtype)

  @property
  def _pair_dim(self) -> int:
    return self.reduced_dim * (self.reduced_dim - 1) // 2 if self.use_plucker else self.reduced_dim

  def _pair_feature(self, z_t: jax.Array, z_s: jax.Array) -> jax.Array:
    """The (normalized) feature of the pair (t, s): Plücker coordinates, or z_s in the no-Plücker ablation."""
    p = plucker_coordinates(z_t, z_s) if self.use_plucker else z_s
    return _normalized(p, self.normalize, self.eps)

  def _decode_step(self, z_Bx1xr: jax.Array, history: dict[str, jax.Array], valid_BxW: jax.Array, t: jax.Array,
                   weights: jax.Array):
    """Partners of position t at slots (t - offset) mod W of the ring (W > max(offsets), so none is overwritten)."""
    window = valid_BxW.shape[1]
    p_sum = jnp.zeros((z_Bx1xr.shape[0], 1, self._pair_dim), jnp.float32)
    count = jnp.zeros((z_Bx1xr.shape[0], 1, 1), jnp.float32)
    for i, offset in enumerate(self.offsets):
      slot = (t - offset) % window
      partner_z = jax.lax.dynamic_slice_in_dim(history["z"], slot, 1, axis=1)
      partner_ok = (jax.lax.dynamic_slice_in_dim(valid_BxW, slot, 1, axis=1) & (t - offset >= 0))[..., None]
      p_sum = p_sum + jnp.where(partner_ok, weights[i] * self._pair_feature(z_Bx1xr, partner_z), 0.0)
      count = count + jnp.where(partner_ok, weights[i], 0.0)
    return p_sum, count
