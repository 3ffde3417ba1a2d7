"""Shared machinery of the gated / delta-rule linear family (retnet, gla, mamba2, deltanet, gated_deltanet): the
parallel core call (`kernels.gated_linear` or `kernels.delta_rule`), their sequence-parallel forms, the decode cache
(`cache/recurrent_state [B, H, K, V]`, float32: its size does not depend on the sequence length), and the per-head
normalization the papers put before the output gate.

The recurrences read the sequence left to right whatever `causal` says: a causal mixer is a valid non-causal one (it
never needs the future), which is how the papers apply these layers to classification. `dropout_rate` is accepted for
the common interface but has nothing to act on: the chunked cores never form attention weights to drop (the papers
regularize these layers with residual and MLP dropout, which the encoder applies).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import AttentionLayer
from attention.ranges import Integer, OneOf
from kernels import sequence as sequence_lib
from kernels.delta_rule import IMPLEMENTATIONS as DELTA_IMPLEMENTATIONS, delta_rule_attention, delta_rule_step
from kernels.delta_rule.sequence_parallel import delta_rule_sequence_parallel
from kernels.gated_linear import IMPLEMENTATIONS as GATED_IMPLEMENTATIONS, gated_linear_attention, gated_linear_step
from kernels.gated_linear.sequence_parallel import gated_linear_sequence_parallel

IMPLEMENTATIONS = tuple(i for i in GATED_IMPLEMENTATIONS if i in DELTA_IMPLEMENTATIONS)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """`x / ||x||` over the last axis in float32 (finite gradient at 0: padded tokens are zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class HeadNorm(nn.Module):
  """Per-head normalization of `[B, L, H, D]` over D with a learned scale `[H, D]`: "rms" (RMSNorm, fla's and
  Gated DeltaNet's) or "layer" (GroupNorm with one group per head: RetNet's, GLA's LayerNorm). float32 statistics."""

  kind: str = "rms"
  eps: float = 1e-5

  @nn.compact
  def __call__(self, y_BxLxHxD: jax.Array) -> jax.Array:
    y = y_BxLxHxD.astype(jnp.float32)
    h, d = y.shape[-2:]
    if self.kind == "layer":
      y = y - jnp.mean(y, axis=-1, keepdims=True)
      y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
      y = y + self.param("bias", nn.initializers.zeros, (h, d), jnp.float32)
    else:
      y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
    return y * self.param("scale", nn.initializers.ones, (h, d), jnp.float32)


class GatedRecurrentLayer(AttentionLayer):
  """Base of the gated / delta-rule variants: `chunk_size` and `implementation` options, the recurrent decode cache,
  and the "state" sequence-parallel form (both cores pass states exactly across shards)."""

  supports_decode: ClassVar[bool] = True
  fixed_size_cache: ClassVar[bool] = True
  option_ranges = {"chunk_size": Integer(1), "implementation": OneOf(IMPLEMENTATIONS)}

  def sequence_parallel_form(self) -> str | None:
    return None if self.decode else "state"

  def _recurrent(self, parallel, sharded, step, q_BxLxHxK, v_BxLxHxV, mask):
    """The parallel core, its sequence-sharded form, or one decode step on the cached state."""
    if not self.decode:
      if sequence_lib.active() is not None:
        sequence_lib.log_once(type(self).__name__, "state passing (kernels/gated_linear, kernels/delta_rule "
                                                   "sequence_parallel.py)")
        return sharded()
      return parallel()
    b, length, h, dk = q_BxLxHxK.shape
    initialized = self.has_variable("cache", "recurrent_state")
    state = self.variable("cache", "recurrent_state", jnp.zeros, (b, h, dk, v_BxLxHxV.shape[-1]), jnp.float32)
    if not initialized:  # init: the parallel causal output, the cache stays empty
      return parallel()
    if length != 1:
      raise ValueError(f"{type(self).__name__}: a decode step takes one position per call, got length {length}")
    state.value, out = step(state.value, None if mask is None else mask[:, 0])
    return out[:, None]

  def gated_mix(self, q, k, v, log_decay, mask, *, chunk_size: int, implementation: str | None):
    """Gated linear attention (`kernels.gated_linear`) of `[B, L, H, *]` q, k, v; log_decay `[B, L, H(, K)]`."""
    return self._recurrent(
        lambda: gated_linear_attention(q, k, v, log_decay, chunk_size=chunk_size, key_mask=mask,
                                       implementation=implementation),
        lambda: gated_linear_sequence_parallel(q, k, v, log_decay, chunk_size=chunk_size, key_mask=mask,
                                               implementation=implementation),
        lambda s, m: gated_linear_step(s, q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], key_mask_B=m), q, v, mask)

  def delta_mix(self, q, k, v, beta, log_decay, mask, *, chunk_size: int, implementation: str | None):
    """The (gated) delta rule (`kernels.delta_rule`); beta and log_decay (or None) `[B, L, H]`."""
    return self._recurrent(
        lambda: delta_rule_attention(q, k, v, beta, log_decay, chunk_size=chunk_size, key_mask=mask,
                                     implementation=implementation),
        lambda: delta_rule_sequence_parallel(q, k, v, beta, log_decay, chunk_size=chunk_size, key_mask=mask,
                                             implementation=implementation),
        lambda s, m: delta_rule_step(s, q[:, 0], k[:, 0], v[:, 0], beta[:, 0],
                                     None if log_decay is None else log_decay[:, 0], key_mask_B=m), q, v, mask)


__all__ = ["GatedRecurrentLayer", "HeadNorm", "IMPLEMENTATIONS", "l2_normalize"]
