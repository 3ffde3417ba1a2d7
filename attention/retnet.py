"""RetNet's multi-scale retention (Sun et al., 2023, "Retentive Network"): linear attention with a fixed decay per
head, `S_t = gamma_h S_{t-1} + k_t v_t^T`, `o_t = S_t^T q_t`, `gamma_h = 1 - 2^(-5-h)` (the paper's multi-scale
decays: heads from short to long memory).

Layer (the paper's MSR): q, k, v projections (k scaled by `head_dim^-0.5`), retention per head on
`kernels.gated_linear` (chunkwise parallel, the paper's chunkwise recurrent form), GroupNorm per head, then the swish
output gate `swish(x W_G) * GroupNorm(Y)` and `out`. Paper defaults: value dim 2x the key dim, xPos rotations on q
and k; here value dim = key dim = `qkv_dim / num_heads` (the framework's projections) and no xPos (the decay already
encodes relative position; the encoder's own position encoding is applied at the input). Decoding keeps the `[H, K, V]`
float32 state (recurrent form). `dropout_rate` has no weights to act on (attention/gated_recurrent.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention.gated_recurrent import GatedRecurrentLayer, HeadNorm
from attention.registry import register


def retnet_log_decays(num_heads: int) -> np.ndarray:
  """`log(1 - 2^(-5-h))` for h = 0..num_heads-1 (float64, exact for many heads: log1p)."""
  return np.log1p(-np.exp2(-5.0 - np.arange(num_heads)))


@register("retnet")
class RetNet(GatedRecurrentLayer):
  """Attributes: chunk_size and implementation of `kernels.gated_linear`."""

  chunk_size: int = 64
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    q, k, v = self.project_qkv(x)
    k = k * self.head_dim(x) ** -0.5
    b, length = x.shape[:2]
    log_decay = jnp.broadcast_to(jnp.asarray(retnet_log_decays(self.num_heads), jnp.float32),
                                 (b, length, self.num_heads))
    y = self.gated_mix(q, k, v, log_decay, mask, chunk_size=self.chunk_size, implementation=self.implementation)
    gate = self.dense((self.num_heads, self.head_dim(x)), "gate", axis=-1)(x)
    y = jax.nn.silu(gate.astype(jnp.float32)) * HeadNorm("layer", name="head_norm")(y)
    return self.project_out(y, x.shape[-1])
