"""DeltaNet and Gated DeltaNet: linear attention whose state is corrected by the delta rule.

- `deltanet` (Schlag et al., 2021; Yang et al., NeurIPS 2024, "Parallelizing Linear Transformers with the Delta Rule
  over Sequence Length"): `S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T`;
- `gated_deltanet` (Yang et al., ICLR 2025, "Gated Delta Networks"): the same with a decay `alpha_t` on the state,
  `alpha_t = exp(-exp(A_log) * softplus(x W_a + dt_bias))` (Mamba-2's parametrization, per head).

Layer (the papers', as fla implements them): q, k, v projections, each through a short causal depthwise convolution
(`conv_size` taps, paper 4, SiLU; `attention/short_conv.py`); q and k L2-normalized per head (q then scaled by
`head_dim^-0.5`) so that `I - beta k k^T` is a contraction; `beta_t = sigmoid(x W_beta)` per head; the chunked core
`kernels.delta_rule` (WY / UT transform); per-head RMSNorm; Gated DeltaNet adds the swish output gate
`swish(x W_g) * RMSNorm(o)` (`output_gate`, default on for gated_deltanet, off for deltanet as in the papers); `out`.
Decoding keeps the `[H, K, V]` float32 state and each convolution's last `conv_size - 1` inputs. `dropout_rate` has no
weights to act on (attention/gated_recurrent.py).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.gated_recurrent import GatedRecurrentLayer, HeadNorm, l2_normalize
from attention.mamba2 import _a_log_init, _dt_bias_init
from attention.ranges import Integer, OneOf
from attention.registry import register
from attention.short_conv import ShortConv


@register("deltanet")
class DeltaNet(GatedRecurrentLayer):
  """Attributes: conv_size (0 = no short convolutions), output_gate, chunk_size and implementation of
  `kernels.delta_rule`."""

  conv_size: int = 4
  output_gate: bool = False
  chunk_size: int = 64
  implementation: str | None = None
  option_ranges = {"conv_size": Integer(0), "output_gate": OneOf((True, False))}
  gated: ClassVar[bool] = False  # Gated DeltaNet's decay alpha_t

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    h, d = self.num_heads, self.head_dim(x)
    q, k, v = self.project_qkv(x)
    if self.conv_size:
      def conv(t, name):
        return ShortConv(self.conv_size, decode=self.decode, dtype=self.compute_dtype, name=name)(
            t.reshape(*t.shape[:2], h * d), mask).reshape(t.shape)
      q, k, v = conv(q, "q_conv"), conv(k, "k_conv"), conv(v, "v_conv")
    q = (l2_normalize(q) * d ** -0.5).astype(v.dtype)
    k = l2_normalize(k).astype(v.dtype)
    beta = jax.nn.sigmoid(nn.Dense(h, dtype=jnp.float32, param_dtype=jnp.float32, name="beta")(
        x.astype(jnp.float32)))
    log_decay = None
    if self.gated:
      a = nn.Dense(h, dtype=jnp.float32, param_dtype=jnp.float32, use_bias=False, name="alpha")(x.astype(jnp.float32))
      dt = jax.nn.softplus(a + self.param("dt_bias", _dt_bias_init, (h,), jnp.float32))
      log_decay = -jnp.exp(self.param("A_log", _a_log_init, (h,), jnp.float32)) * dt
    y = self.delta_mix(q, k, v, beta, log_decay, mask, chunk_size=self.chunk_size, implementation=self.implementation)
    y = HeadNorm("rms", name="head_norm")(y)
    if self.output_gate:
      y = jax.nn.silu(self.dense((h, d), "gate", axis=-1)(x).astype(jnp.float32)) * y
    return self.project_out(y, x.shape[-1])


@register("gated_deltanet")
class GatedDeltaNet(DeltaNet):
  """DeltaNet with the decay alpha_t (see the module docstring); the output gate is on by default (the paper)."""

  output_gate: bool = True
  gated: ClassVar[bool] = True

