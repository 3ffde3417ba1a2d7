"""Softmax attention on `[batch, length, heads, head_dim]` tensors: the public entry and its dispatch.

implementation: "reference" (`kernels.softmax.reference`, the ground truth), "xla" / "cudnn"
(`jax.nn.dot_product_attention` with that implementation), None (`jax.nn.dot_product_attention`'s own choice: cuDNN
flash attention on GPU where it applies, XLA elsewhere).
"""

from __future__ import annotations

from typing import Literal

import jax

from kernels.softmax.reference import causal_mask, dropout_weights, softmax_attention_reference

Implementation = Literal["reference", "xla", "cudnn"] | None
IMPLEMENTATIONS = ("reference", "xla", "cudnn", None)


def softmax_attention(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array, *,
                      mask: jax.Array | None = None, causal: bool = False, scale: float | None = None,
                      implementation: Implementation = None, dropout_rate: float = 0.0,
                      dropout_rng: jax.Array | None = None) -> jax.Array:
  """Softmax attention; `mask` broadcasts to `[B, H, L, S]` (True = may attend).

  Attention dropout needs the weights, which `jax.nn.dot_product_attention` does not expose, so a call with dropout
  runs the reference form whatever `implementation` says.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown softmax implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  if implementation == "reference" or (dropout_rate > 0.0 and dropout_rng is not None):
    return softmax_attention_reference(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, mask=mask, causal=causal, scale=scale,
                                       dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  return jax.nn.dot_product_attention(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, mask=mask, is_causal=causal, scale=scale,
                                      implementation=implementation)


__all__ = ["IMPLEMENTATIONS", "Implementation", "causal_mask", "dropout_weights", "softmax_attention",
           "softmax_attention_reference"]
