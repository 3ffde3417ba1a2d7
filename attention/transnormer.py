"""TransNormer (Qin et al., 2022, "The Devil in Linear Transformer"): NormAttention and DiagAttention.

- `mode="norm"` (NormAttention): linear attention *without* the denominator, `phi(q) (phi(k)^T v)` with
  `phi = 1 + elu`, followed by SRMSNorm (`x / (rms(x) + eps)`, no learned scale) over the concatenated heads: the
  normalization replaces the unbounded-gradient-prone scaling of the denominator.
- `mode="diag"` (DiagAttention): exact softmax attention inside non-overlapping blocks of `block_size` tokens
  (block-diagonal), causal within the block when `causal=True`. Lengths that are not a multiple of `block_size` are
  padded internally and the padding masked.

The paper uses DiagAttention in the early half of the layers and NormAttention in the later half; the encoder applies
that schedule (`default_layer_options`) unless `config.model.layer_options` says otherwise. Both modes decode with a
fixed-size cache (the linear state, or the current block's keys and values). `dropout_rate` drops DiagAttention's
weights; NormAttention has none.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.recurrent import RecurrentLayer
from attention.registry import register
from attention.ranges import Integer, OneOf
from kernels.block_diagonal import block_diagonal_attention
from kernels.softmax import softmax_attention_reference

MODES = ("norm", "diag")

__all__ = ["MODES", "TransNormer", "block_diagonal_attention", "srms_norm"]


def srms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Simple RMSNorm: `x / (rms(x) + eps)` over the last axis, in float32, no parameters."""
  x32 = x.astype(jnp.float32)
  return (x32 / (jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)) + eps)).astype(x.dtype)


@register("transnormer")
class TransNormer(RecurrentLayer):
  """Attributes: mode ("norm" | "diag"), block_size (DiagAttention), chunk_size and implementation of
  `kernels.linear_attention` (NormAttention)."""

  mode: str = "norm"
  block_size: int = 64
  chunk_size: int = 64
  implementation: str | None = None
  option_ranges = {"mode": OneOf(MODES), "block_size": Integer(1)}

  @classmethod
  def default_layer_options(cls, num_layers: int) -> tuple[dict, ...]:
    """The paper's architecture: DiagAttention in the first half of the layers, NormAttention in the rest."""
    return tuple({"mode": "diag" if i < num_layers // 2 else "norm"} for i in range(num_layers))

  def sequence_parallel_form(self) -> str | None:
    # NormAttention passes states; DiagAttention's blocks take the exact fallback.
    return super().sequence_parallel_form() if self.mode == "norm" else None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    q, k, v = self.project_qkv(x)
    if self.mode == "norm":
      phi = lambda t: jax.nn.elu(t.astype(jnp.float32)) + 1.0  # noqa: E731
      y = self.linear_mix(phi(q), phi(k), v, mask, normalize=False, chunk_size=self.chunk_size,
                          implementation=self.implementation)
      b, length = y.shape[:2]
      y = srms_norm(y.reshape(b, length, -1)).reshape(y.shape)
      return self.project_out(y, x.shape[-1])
    # DiagAttention decodes with a cache of the current block only, cleared when a new block starts.
    step = self.ring_cache("block", self.block_size, {"key": k, "value": v}, mask,
                           reset_every_cycle=True) if self.decode else None
    if step is not None:
      block, valid_BxS, _ = step
      y = softmax_attention_reference(q, block["key"], block["value"], mask=valid_BxS[:, None, None, :])
    else:
      y = block_diagonal_attention(q, k, v, block_size=self.block_size, causal=self.causal, key_mask=mask,
                                   dropout_rate=self.dropout_rate, dropout_rng=self.dropout_rng(deterministic))
    return self.project_out(y, x.shape[-1])
