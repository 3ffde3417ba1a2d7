"""Based (Arora et al., 2024, "Simple linear attention language models balance the recall-throughput tradeoff").

The paper's model stacks three kinds of sequence-mixing layers; `mode` picks one per layer:
- `"taylor"`: linear attention with the second-order Taylor feature map of `exp(q·k)`:
  `phi(x) = [1, x / d'^(1/4), vec(x x^T) / (sqrt(2) sqrt(d'))]`, so `phi(q)·phi(k) = 1 + s + s^2/2` with
  `s = q·k / sqrt(d')`, which is always positive; q and k are projected to a small feature dimension `d' =
  feature_dim` (default 16, the paper's) by their own projections (`feature_query`, `feature_key`), values by `value`
  (`1 + 16 + 256 = 273` features, which the Mosaic GPU kernel zero-pads to 320: `kernels.linear_attention`);
- `"window"`: exact softmax attention over a sliding window of `window` positions (default 64) with the shared
  `query` / `key` / `value` projections (`kernels.sliding_window_attention`);
- `"conv"`: a gated short convolution (the paper's BaseConv): `y = silu(conv(u)) * gate` with `u = value(x)`,
  `gate = conv_gate(x)` and a depthwise convolution over `conv_kernel_size` positions (default 3); causal (t sees
  t - K + 1 .. t) with `causal=True`, centred otherwise;
- `"hybrid"` (the default, what earlier versions computed): the taylor and window outputs summed in one layer.

`default_layer_options(num_layers)` gives the paper's mix, which the encoder uses unless `config.model.layer_options`
is set: the released 360M model (HazyResearch/based, `train/configs/experiment/reference/based-360m.yaml`, 27
layers) puts linear attention at layers 1, 6, 11, ... and sliding-window attention at layers 2, 7, 12, ..., BaseConv
everywhere else, i.e. the period-5 pattern [conv, taylor, window, conv, conv], repeated here over any depth (the
27-layer release lists layers up to 22, so its layer 26 is a convolution where the repeated pattern has taylor).
Depths below 3 cannot hold all three kinds: one layer is "hybrid", two are [conv, hybrid].

Every mode decodes with a fixed-size cache: the Taylor state, a ring buffer of the last `window` keys and values, or
of the last `conv_kernel_size` convolution inputs. `dropout_rate` is not applied (the linear branch has no attention
weights to drop; the window branch follows it).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import default_kernel_init
from attention.recurrent import RecurrentLayer
from attention.registry import register
from attention.ranges import Integer, OneOf
from kernels.softmax import softmax_attention_reference
from kernels.sliding_window import sliding_window_attention


def taylor_features(x_BxLxHxF: jax.Array) -> jax.Array:
  """Second-order Taylor features of exp: `[B, L, H, 1 + F + F^2]` in float32."""
  x = x_BxLxHxF.astype(jnp.float32)
  f = x.shape[-1]
  x = x * f ** -0.25  # so that phi(q)·phi(k) expands exp(q·k / sqrt(F))
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], f * f) / math.sqrt(2.0)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer], axis=-1)


MODES = ("hybrid", "taylor", "window", "conv")
# The released Based models' layer pattern (see the module docstring), repeated over the depth.
PAPER_PATTERN = ("conv", "taylor", "window", "conv", "conv")


def paper_layer_modes(num_layers: int) -> tuple[str, ...]:
  """The paper's mix of layer kinds for an encoder of `num_layers` layers."""
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  if num_layers == 1:
    return ("hybrid",)
  if num_layers == 2:
    return ("conv", "hybrid")
  return tuple(PAPER_PATTERN[i % len(PAPER_PATTERN)] for i in range(num_layers))


@register("based")
class Based(RecurrentLayer):
  """Attributes: mode ("hybrid" | "taylor" | "window" | "conv"), feature_dim (Taylor feature width per head), window
  (sliding-window size), conv_kernel_size (gated convolution width), chunk_size and implementation of
  `kernels.linear_attention`."""

  mode: str = "hybrid"
  feature_dim: int = 16
  window: int = 64
  conv_kernel_size: int = 3
  chunk_size: int = 64
  implementation: str | None = None
  option_ranges = {"mode": OneOf(MODES), "feature_dim": Integer(1), "window": Integer(1),
                   "conv_kernel_size": Integer(1)}

  @classmethod
  def default_layer_options(cls, num_layers: int) -> tuple[dict, ...]:
    """The paper's architecture: mostly gated convolutions, with Taylor linear attention and sliding-window layers."""
    return tuple({"mode": m} for m in paper_layer_modes(num_layers))

  def sequence_parallel_form(self) -> str | None:
    # Taylor: state passing; the gated convolution has no keys (GSPMD exchanges its halo); the sliding window takes
    # the exact fallback.
    forms = {"taylor": super().sequence_parallel_form(), "conv": "gspmd"}
    return forms.get(self.mode)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    v = self.project(x, "value")
    if self.mode == "conv":
      return self.project_out(self._gated_conv(x, v, mask), x.shape[-1])
    y = jnp.zeros(v.shape, jnp.float32)
    if self.mode in ("taylor", "hybrid"):
      feature = lambda name: self.dense(  # noqa: E731
          (self.num_heads, self.feature_dim), name, kernel_init=default_kernel_init)(x)
      phi_q, phi_k = taylor_features(feature("feature_query")), taylor_features(feature("feature_key"))
      y_global = self.linear_mix(phi_q, phi_k, v, mask, normalize=True, chunk_size=self.chunk_size,
                                 implementation=self.implementation)
      y = y + y_global.astype(jnp.float32)
    if self.mode in ("window", "hybrid"):
      q, k = self.project(x, "query"), self.project(x, "key")
      # Decoding keeps a ring buffer of the last `window` positions: exactly the keys the causal window allows.
      step = self.ring_cache("window", self.window, {"key": k, "value": v}, mask) if self.decode else None
      if step is not None:
        window, valid_BxW, _ = step
        y_local = softmax_attention_reference(q, window["key"], window["value"], mask=valid_BxW[:, None, None, :])
      else:
        y_local = sliding_window_attention(q, k, v, window=self.window, causal=self.causal, key_mask=mask)
      y = y + y_local.astype(jnp.float32)
    return self.project_out(y, x.shape[-1])

  def _gated_conv(self, x: jax.Array, u_BxLxHxD: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`silu(depthwise_conv(u)) * gate`, `[B, L, H, D]` in float32; padded positions enter the convolution as 0."""
    size = self.conv_kernel_size
    gate = self.project(x, "conv_gate").astype(jnp.float32)
    # Depthwise kernel, tap j weighs position t - j (+ the centring offset when not causal); fan-in = size.
    kernel_KxHxD = self.param("conv_kernel", nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0,
                                                                              out_axis=()),
                              (size, *u_BxLxHxD.shape[2:]), jnp.float32)
    u = u_BxLxHxD.astype(jnp.float32)
    if mask is not None:
      u = jnp.where(mask[:, :, None, None], u, 0.0)
    step = self.ring_cache("conv", size, {"u": u}, mask) if self.decode else None
    if step is not None:  # the ring holds positions t - size + 1 .. t at slots (t - j) % size
      history, valid_BxK, t = step
      conv = jnp.zeros_like(u)
      for j in range(size):
        slot = (t - j) % size
        past = jax.lax.dynamic_slice_in_dim(history["u"], slot, 1, axis=1)
        ok = jax.lax.dynamic_slice_in_dim(valid_BxK, slot, 1, axis=1) & (t - j >= 0)
        conv = conv + jnp.where(ok[:, :, None, None], past, 0.0) * kernel_KxHxD[j]
    else:
      centre = 0 if self.causal else (size - 1) // 2
      length = u.shape[1]
      padded = jnp.pad(u, ((0, 0), (size - 1 - centre, centre), (0, 0), (0, 0)))
      # out[t] = sum_j kernel[j] * u[t - j + centre]; padded[i] = u[i - (size - 1 - centre)].
      conv = sum(padded[:, size - 1 - j:size - 1 - j + length] * kernel_KxHxD[j] for j in range(size))
    return jax.nn.silu(conv) * gate
