"""Mamba-2's SSD mixer (Dao & Gu, ICML 2024, "Transformers are SSMs"): a selective state space with a scalar,
data-dependent decay per head and token, `S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t x_t^T`, `y_t = S_t^T C_t + D_h x_t`:
linear attention with `q = C`, `k = dt B`, `v = x` and the decay `exp(dt A)` (`kernels.gated_linear`, per head).

Layer (the paper's block, one group of B/C shared by the heads, `ngroups=1`): projections of x to the gate z (`gate`),
the SSM input x (`value`, `H * P` with `P = qkv_dim / num_heads`), B (`key`) and C (`query`) of size `d_state` and
`dt` per head; a short causal depthwise convolution (`conv_size` taps, paper 4, SiLU; `attention/short_conv.py`) over
[x, B, C]; `dt = softplus(dt + dt_bias)` with `dt_bias` initialized so dt starts in [1e-3, 1e-1] (the paper's
dt_min / dt_max); `A = -exp(A_log)`, A_log from log U[1, 16]; the skip `D` (ones); the gated RMSNorm
`RMSNorm(y * silu(z))` over the whole inner width; `out`. Paper default `d_state` is 128 (64 here: LRA widths are
small; an option). Decoding keeps the `[H, N, P]` float32 state and the convolution's last `conv_size - 1` inputs.
`dropout_rate` has no weights to act on (attention/gated_recurrent.py).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import default_kernel_init
from attention.gated_recurrent import GatedRecurrentLayer
from attention.ranges import Integer
from attention.registry import register
from attention.short_conv import ShortConv

DT_MIN, DT_MAX = 1e-3, 1e-1


def _dt_bias_init(key, shape, dtype=jnp.float32):
  """softplus^-1 of dt ~ exp(U[log dt_min, log dt_max]): the paper's initialization."""
  dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(DT_MIN), math.log(DT_MAX)))
  return dt + jnp.log(-jnp.expm1(-dt))


def _a_log_init(key, shape, dtype=jnp.float32):
  return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


@register("mamba2")
class Mamba2(GatedRecurrentLayer):
  """Attributes: d_state (N), conv_size, chunk_size and implementation of `kernels.gated_linear`."""

  d_state: int = 64
  conv_size: int = 4
  chunk_size: int = 64
  implementation: str | None = None
  option_ranges = {"d_state": Integer(1), "conv_size": Integer(1)}

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    h, p, n = self.num_heads, self.head_dim(x), self.d_state
    z = self.dense((h, p), "gate", axis=-1)(x)
    xs = self.dense(h * p, "value", kernel_init=default_kernel_init)(x)
    bs = self.dense(n, "key", kernel_init=default_kernel_init)(x)
    cs = self.dense(n, "query", kernel_init=default_kernel_init)(x)
    dt = nn.Dense(h, dtype=jnp.float32, param_dtype=jnp.float32, use_bias=False, name="dt")(x.astype(jnp.float32))
    xbc = ShortConv(self.conv_size, decode=self.decode, dtype=self.compute_dtype, name="conv")(
        jnp.concatenate([xs, bs, cs], axis=-1), mask)
    xs, bs, cs = jnp.split(xbc, [h * p, h * p + n], axis=-1)
    dt = jax.nn.softplus(dt + self.param("dt_bias", _dt_bias_init, (h,), jnp.float32))  # [B, L, H]
    a = -jnp.exp(self.param("A_log", _a_log_init, (h,), jnp.float32))
    b, length = x.shape[:2]
    v = xs.reshape(b, length, h, p)
    k = bs[:, :, None, :].astype(jnp.float32) * dt[..., None]  # dt B, per head
    q = jnp.broadcast_to(cs[:, :, None, :], (b, length, h, n))
    y = self.gated_mix(q, k.astype(v.dtype), v, dt * a, mask, chunk_size=self.chunk_size,
                       implementation=self.implementation)
    y = y.astype(jnp.float32) + self.param("D", nn.initializers.ones, (h,), jnp.float32)[:, None] * v
    # Gated RMSNorm over the inner width (ngroups = 1), as Mamba-2's RMSNormGated(norm_before_gate=False).
    y = (y * jax.nn.silu(z.astype(jnp.float32))).reshape(b, length, h * p)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-5)
    y = y * self.param("norm_scale", nn.initializers.ones, (h * p,), jnp.float32)
    return self.project_out(y.reshape(b, length, h, p), x.shape[-1])
