"""Gated linear attention (Yang et al., ICML 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training"): a data-dependent decay per key dimension, `S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`, `o_t = S_t^T q_t`.

Layer (the paper's): q, k (key dim `expand_k * head_dim`, paper 0.5; q scaled by `key_dim^-0.5`), v; the gate
`alpha_t = sigmoid(x W1 W2 + b)^(1/gate_normalizer)` with a low-rank `W1 W2` (rank `gate_low_rank`, paper 16;
normalizer paper 16), computed in log space (`log alpha = log_sigmoid(.) / 16`, never underflowing); the chunked core
`kernels.gated_linear` with the per-key decay; per-head LayerNorm ("layer", the paper) or RMSNorm; the swish output
gate `swish(x W_r) * norm(o)`; `out`. Decoding keeps the `[H, K, V]` float32 state. `dropout_rate` has no weights to
act on (attention/gated_recurrent.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import default_kernel_init
from attention.gated_recurrent import GatedRecurrentLayer, HeadNorm
from attention.ranges import Integer, OneOf, Real
from attention.registry import register


@register("gla")
class GLA(GatedRecurrentLayer):
  """Attributes: expand_k (key dim / head dim), gate_low_rank, gate_normalizer, norm ("layer" | "rms"), chunk_size
  and implementation of `kernels.gated_linear` (16-token chunks: the per-key decay factor is `[C, C, K]` per chunk)."""

  expand_k: float = 0.5
  gate_low_rank: int = 16
  gate_normalizer: float = 16.0
  norm: str = "layer"
  chunk_size: int = 16
  implementation: str | None = None
  option_ranges = {"expand_k": Real(0.0, lo_open=True), "gate_low_rank": Integer(1),
                   "gate_normalizer": Real(0.0, lo_open=True), "norm": OneOf(("layer", "rms"))}

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    h, d = self.num_heads, self.head_dim(x)
    dk = max(1, int(round(self.expand_k * d)))
    q = self.dense((h, dk), "query", axis=-1, kernel_init=default_kernel_init)(x)
    k = self.dense((h, dk), "key", axis=-1, kernel_init=default_kernel_init)(x)
    v = self.project(x, "value")
    q = q * dk ** -0.5
    low = self.dense(self.gate_low_rank, "gate_down", use_bias=False)(x)
    logits = nn.DenseGeneral((h, dk), dtype=jnp.float32, param_dtype=jnp.float32, name="gate_up")(
        low.astype(jnp.float32))
    log_decay = jax.nn.log_sigmoid(logits) / self.gate_normalizer
    y = self.gated_mix(q, k, v, log_decay, mask, chunk_size=self.chunk_size, implementation=self.implementation)
    gate = self.dense((h, d), "gate", axis=-1)(x)
    y = jax.nn.silu(gate.astype(jnp.float32)) * HeadNorm(self.norm, name="head_norm")(y)
    return self.project_out(y, x.shape[-1])
