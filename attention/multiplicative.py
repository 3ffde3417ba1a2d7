"""Multiplicative attention (Luong et al., 2015), multi-head: `form="dot"` scores `qᵀk`, "general" `qᵀ W_a k`.

Per head h with q = query(x), k = key(x) (the shared projections); `W_a: [D, D]` (`w_a`) per head. As in Luong's
paper there is no 1/sqrt(D) scaling: that is what tells `multiplicative(form="dot")` apart from `softmax` (Vaswani's
scaled dot product). Scores `[B, H, L, S]` are formed in float32 (this layer materializes them, like the reference
softmax; memory O(B * H * L * S)), then softmax over the allowed keys, dropout and the weighted sum of values.

Positions: ALiBi biases for both forms; RoPE only with `form="dot"` (for "general", `W_a` between two rotations does
not make the score a function of the offset, so it is refused). Decoding caches the keys (rotated, for RoPE) and the
values of every position in a ring cache of the maximum length.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from attention import positions as positions_lib
from attention.additive import ScoredAttention
from attention.ranges import OneOf
from attention.registry import register

FORMS = ("dot", "general")


@register("multiplicative")
class MultiplicativeAttention(ScoredAttention):
  """Attributes (besides the common ones of `AttentionLayer`): form, "dot" (`qᵀk`) or "general" (`qᵀ W_a k`)."""

  form: str = "dot"
  option_ranges = {"form": OneOf(FORMS)}

  @classmethod
  def positions_for(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
    # RoPE rotates q and k before q^T k; the "general" form's W_a between them would not commute with the rotation.
    return ("none", "rope", "alibi") if options.get("form", cls.form) == "dot" else ("none", "alibi")

  def prepare(self, q_BxLxHxD, k_BxSxHxD, offset):
    if self.form == "general":
      heads, head_dim = q_BxLxHxD.shape[2:]
      init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
      w_a = self.param("w_a", init, (heads, head_dim, head_dim), jnp.float32)
      # qᵀ W_a k = (W_aᵀ q)ᵀ k: transform the queries once (the score itself stays a dot product).
      q_BxLxHxD = jnp.einsum("blhd,hde->blhe", q_BxLxHxD, w_a.astype(self.compute_dtype)).astype(self.compute_dtype)
    if self.positions == "rope":
      q_BxLxHxD, k_BxSxHxD = positions_lib.rope(q_BxLxHxD, offset), positions_lib.rope(k_BxSxHxD, offset)
    return q_BxLxHxD, k_BxSxHxD

  def scores(self, q_BxLxHxD, k_BxSxHxD):
    return jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k_BxSxHxD, preferred_element_type=jnp.float32)

