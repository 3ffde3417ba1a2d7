"""Based (Arora et al., 2024, "Simple linear attention language models balance the recall-throughput tradeoff").

Two branches over the same values, summed before the output projection:
- global: linear attention with the second-order Taylor feature map of `exp(q·k)`:
  `phi(x) = [1, x / d'^(1/4), vec(x x^T) / (sqrt(2) sqrt(d'))]`, so `phi(q)·phi(k) = 1 + s + s^2/2` with
  `s = q·k / sqrt(d')`, which is always positive; q and k are projected to a small feature dimension `d' =
  feature_dim` (default 16) by their own projections (`feature_query`, `feature_key`);
- local: exact softmax attention over a sliding window of `window` positions (default 64) using the shared
  `query` / `key` projections (`kernels.sliding_window_attention`).

The paper stacks these as separate layers (with gated convolutions); the framework's encoder has one attention plug,
so both branches live in one layer here. Decoding keeps a fixed-size cache: the Taylor state and a ring buffer of the
last `window` keys and values. `dropout_rate` has no attention weights to act on in the linear branch and is not
applied.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import AttentionLayer, default_kernel_init
from attention.recurrent import linear_mix
from attention.registry import register
from attention.softmax import softmax_attention_reference
from kernels.sliding_window import sliding_window_attention


def taylor_features(x_BxLxHxF: jax.Array) -> jax.Array:
  """Second-order Taylor features of exp: `[B, L, H, 1 + F + F^2]` in float32."""
  x = x_BxLxHxF.astype(jnp.float32)
  f = x.shape[-1]
  x = x * f ** -0.25  # so that phi(q)·phi(k) expands exp(q·k / sqrt(F))
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], f * f) / math.sqrt(2.0)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer], axis=-1)


@register("based")
class Based(AttentionLayer):
  """Attributes: feature_dim (Taylor branch width per head), window (sliding-window size), chunk_size and
  implementation of `kernels.linear_attention`."""

  feature_dim: int = 16
  window: int = 64
  chunk_size: int = 64
  implementation: str | None = None

  supports_decode = True

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    if self.feature_dim < 1 or self.window < 1:
      raise ValueError(f"feature_dim and window must be >= 1, got {self.feature_dim=} {self.window=}")
    q, k, v = self.project_qkv(x)
    feature = lambda name: nn.DenseGeneral((self.num_heads, self.feature_dim), kernel_init=default_kernel_init,  # noqa: E731
                                           name=name)(x)
    phi_q, phi_k = taylor_features(feature("feature_query")), taylor_features(feature("feature_key"))
    y_global = linear_mix(self, phi_q, phi_k, v, mask, causal=self.causal, normalize=True,
                          chunk_size=self.chunk_size, implementation=self.implementation, decode=self.decode)
    if self.decode and self.has_variable("cache", "window_key"):
      y_local = self._window_step(q, k, v, mask)
    else:
      if self.decode:
        self._window_cache(k, v)
      y_local = sliding_window_attention(q, k, v, window=self.window, causal=self.causal, key_mask_BxL=mask)
    y = y_global.astype(jnp.float32) + y_local.astype(jnp.float32)
    return self.project_out(y.astype(x.dtype), x.shape[-1])

  def _window_cache(self, k, v):
    b, _, h, d = k.shape
    shape = (b, self.window, h, d)
    return (self.variable("cache", "window_key", jnp.zeros, shape, k.dtype),
            self.variable("cache", "window_value", jnp.zeros, shape, v.dtype),
            self.variable("cache", "window_mask", jnp.zeros, (b, self.window), bool),
            self.variable("cache", "window_index", lambda: jnp.array(0, jnp.int32)))

  def _window_step(self, q, k, v, mask):
    """A ring buffer of the last `window` positions: exactly the keys the causal window allows."""
    if q.shape[1] != 1:
      raise ValueError(f"decode step expects one position per call, got length {q.shape[1]}")
    keys, values, valid, index = self._window_cache(k, v)
    slot = index.value % self.window
    step_mask = jnp.ones((q.shape[0], 1), bool) if mask is None else mask.astype(bool)
    keys.value = jax.lax.dynamic_update_slice(keys.value, k, (0, slot, 0, 0))
    values.value = jax.lax.dynamic_update_slice(values.value, v, (0, slot, 0, 0))
    valid.value = jax.lax.dynamic_update_slice(valid.value, step_mask, (0, slot))
    index.value = index.value + 1
    return softmax_attention_reference(q, keys.value, values.value, mask=valid.value[:, None, None, :])
