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

from attention.base import AttentionLayer
from attention.recurrent import linear_mix
from attention.registry import register
from attention.softmax import softmax_attention_reference

MODES = ("norm", "diag")


def srms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Simple RMSNorm: `x / (rms(x) + eps)` over the last axis, in float32, no parameters."""
  x32 = x.astype(jnp.float32)
  return (x32 / (jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)) + eps)).astype(x.dtype)


def block_diagonal_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, *, block_size: int, causal: bool,
                             key_mask_BxL=None, dropout_rate: float = 0.0, dropout_rng=None) -> jax.Array:
  """Softmax attention within non-overlapping blocks of `block_size` positions."""
  b, length, h, d = q_BxLxHxD.shape
  pad = -length % block_size
  key_mask = jnp.ones((b, length), bool) if key_mask_BxL is None else key_mask_BxL.astype(bool)
  pad_seq = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
  n = (length + pad) // block_size
  to_blocks = lambda x: pad_seq(x).reshape(b * n, block_size, *x.shape[2:])  # noqa: E731
  mask = to_blocks(key_mask)[:, None, None, :]
  out = softmax_attention_reference(to_blocks(q_BxLxHxD), to_blocks(k_BxLxHxD), to_blocks(v_BxLxHxD), mask=mask,
                                    causal=causal, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  return out.reshape(b, n * block_size, h, d)[:, :length]


@register("transnormer")
class TransNormer(AttentionLayer):
  """Attributes: mode ("norm" | "diag"), block_size (DiagAttention), chunk_size and implementation of
  `kernels.linear_attention` (NormAttention)."""

  mode: str = "norm"
  block_size: int = 64
  chunk_size: int = 64
  implementation: str | None = None

  supports_decode = True

  @staticmethod
  def default_layer_options(num_layers: int) -> tuple[dict, ...]:
    """The paper's architecture: DiagAttention in the first half of the layers, NormAttention in the rest."""
    return tuple({"mode": "diag" if i < num_layers // 2 else "norm"} for i in range(num_layers))

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    if self.mode not in MODES:
      raise ValueError(f"unknown transnormer mode {self.mode!r}; valid choices: {MODES}")
    if self.block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {self.block_size}")
    q, k, v = self.project_qkv(x)
    if self.mode == "norm":
      phi = lambda t: jax.nn.elu(t.astype(jnp.float32)) + 1.0  # noqa: E731
      y = linear_mix(self, phi(q), phi(k), v, mask, causal=self.causal, normalize=False,
                     chunk_size=self.chunk_size, implementation=self.implementation, decode=self.decode)
      b, length = y.shape[:2]
      y = srms_norm(y.reshape(b, length, -1)).reshape(y.shape)
    else:
      dropout_rng = self.make_rng("dropout") if not deterministic and self.dropout_rate > 0 else None
      if self.decode and self.has_variable("cache", "block_key"):
        y = self._diag_step(q, k, v, mask)
      else:
        if self.decode:
          self._block_cache(k, v)
        y = block_diagonal_attention(q, k, v, block_size=self.block_size, causal=self.causal, key_mask_BxL=mask,
                                     dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)
    return self.project_out(y.astype(x.dtype), x.shape[-1])

  def _block_cache(self, k, v):
    b, _, h, d = k.shape
    shape = (b, self.block_size, h, d)
    return (self.variable("cache", "block_key", jnp.zeros, shape, k.dtype),
            self.variable("cache", "block_value", jnp.zeros, shape, v.dtype),
            self.variable("cache", "block_mask", jnp.zeros, (b, self.block_size), bool),
            self.variable("cache", "index", lambda: jnp.array(0, jnp.int32)))

  def _diag_step(self, q, k, v, mask):
    """Decoding DiagAttention: the cache holds the current block only; it is cleared when a new block starts."""
    if q.shape[1] != 1:
      raise ValueError(f"decode step expects one position per call, got length {q.shape[1]}")
    keys, values, valid, index = self._block_cache(k, v)
    slot = index.value % self.block_size
    fresh = slot == 0
    step_mask = jnp.ones((q.shape[0], 1), bool) if mask is None else mask.astype(bool)
    keys.value = jax.lax.dynamic_update_slice(keys.value, k, (0, slot, 0, 0))
    values.value = jax.lax.dynamic_update_slice(values.value, v, (0, slot, 0, 0))
    cleared = jnp.where(fresh, jnp.zeros_like(valid.value), valid.value)
    valid.value = jax.lax.dynamic_update_slice(cleared, step_mask, (0, slot))
    index.value = index.value + 1
    return softmax_attention_reference(q, keys.value, values.value, mask=valid.value[:, None, None, :])
