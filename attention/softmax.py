"""Exact softmax attention (Vaswani et al., 2017): the baseline every other variant is compared against.

The functional core (`softmax_attention`, its reference and implementations) is `kernels.softmax`; this module is the
layer: projections, padding mask, causal mode and a flax-style decode cache of every position (a ring cache of the
maximum length). Training and decoding call the same entry, `softmax_attention` (flash attention by default): decoding
passes one query row over the cached keys with `key_mask` = the written slots.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from attention import positions
from attention.base import AttentionLayer
from attention.flex import project_kv, repeat_kv
from attention.registry import register
from attention.ranges import KV_HEADS_DIVIDE_HEADS, Integer, OneOf
from kernels import sequence as sequence_lib
from kernels.softmax import IMPLEMENTATIONS, Implementation, softmax_attention, softmax_attention_reference
from kernels.softmax.sequence_parallel import refusal as ring_refusal, ring_attention

__all__ = ["IMPLEMENTATIONS", "SoftmaxAttention", "softmax_attention", "softmax_attention_reference"]


@register("softmax")
class SoftmaxAttention(AttentionLayer):
  """Multi-head softmax attention with padding mask, causal mode and a flax-style decode cache.

  Attributes (besides the common ones of `AttentionLayer`):
    implementation: see `kernels.softmax.softmax_attention`; default None picks the best available on the backend.
    num_kv_heads: key/value heads (grouped-query attention: a divisor of `num_heads`, 1 = multi-query; None =
      `num_heads`); the decode cache holds this many heads, repeated to the query heads for the core.
  """

  implementation: Implementation = None
  num_kv_heads: int | None = None
  option_ranges = {"implementation": OneOf(IMPLEMENTATIONS, what="softmax implementation"),
                   "num_kv_heads": Integer(1, allow_none=True)}
  option_constraints = (KV_HEADS_DIVIDE_HEADS,)  # checked by the gate when the layer is built, not at a call

  supports_decode = True
  supported_positions = ("none", "rope", "alibi")

  def sequence_parallel_form(self) -> str | None:
    # Ring attention over the flash block primitive; dropout is the counter hash keyed by global positions in both.
    return None if self.decode else "ring"

  def sequence_parallel_refusal(self) -> str | None:
    """Why these options cannot run sequence-sharded (read by the config checks before any data is read)."""
    return ring_refusal(self.implementation, dropout=self.dropout_rate > 0.0, alibi=self.positions == "alibi")

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)  # `implementation` passed the gate (option_ranges) when the layer was built
    q, k, v = self.project(x, "query"), project_kv(self, x, "key"), project_kv(self, x, "value")
    if self.positions == "rope":  # rotated before caching: a decode step sits at the cache's index
      offset = positions.decode_offset(self, "cached") if self.decode else 0
      q, k = positions.rope(q, offset), positions.rope(k, offset)
    dropout_rng = self.dropout_rng(deterministic)
    # ALiBi in the core: a decode step's query sits at the last cache slot, a constant shift of every allowed key's
    # bias from its true position t (softmax ignores it; unwritten slots are masked).
    # Numpy slopes: constants the kernels' plan takes (traced ones would keep ALiBi on the XLA form). K/V keep their
    # `num_kv_heads`: the core takes the group as it is (its kernels load each key/value head once per group).
    slopes = positions.alibi_slopes(self.num_heads) if self.positions == "alibi" else None
    attend = lambda q, k, v, m, causal: softmax_attention(  # noqa: E731
        q, k, v, key_mask=m, causal=causal,
        implementation=self.implementation, dropout_rate=self.dropout_rate,
        dropout_rng=dropout_rng, alibi_slopes=slopes)

    # Decoding: the cache holds every position up to the length `init` saw; unwritten slots are masked.
    step = self.ring_cache("cached", x.shape[1], {"key": k, "value": v}, mask) if self.decode else None
    if step is not None:
      cached, valid_BxS, _ = step
      y = attend(q, cached["key"], cached["value"], valid_BxS, False)
    elif sequence_lib.active() is not None and self.sequence_parallel_form() == "ring":
      # Every option of the one-device call goes through (ALiBi at global positions, the implementation's blocks;
      # what the ring cannot honour is refused there); RoPE was applied above to the whole (sharded) length.
      y = ring_attention(q, repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads), key_mask_BxL=mask,
                         causal=self.causal, dropout_rate=self.dropout_rate,
                         dropout_rng=dropout_rng, alibi_slopes=slopes,
                         implementation=self.implementation).astype(q.dtype)
    else:
      y = attend(q, k, v, mask, self.causal)
    return self.project_out(y, x.shape[-1])
