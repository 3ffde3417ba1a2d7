"""Block-diagonal softmax attention (TransNormer's DiagAttention): softmax attention within non-overlapping blocks of
`block_size` positions, causal inside a block when `causal`; `key_mask` (bool `[batch, keys]`, True = a real key)
excludes padded keys.

Implementations (the op template of docs/architecture.md "Functional cores"): "reference" (`reference.py`), whose
cost is already linear in length (`L * block_size`); None is "reference" on every platform (no XLA or Pallas form
yet: "xla", "pallas" and "interpret" are refused).
"""

from __future__ import annotations

import jax

from kernels.block_diagonal.reference import block_diagonal_attention_reference

IMPLEMENTATIONS = ("reference", None)
OP = "block_diagonal_attention"


def block_diagonal_attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, *, block_size: int,
                             causal: bool, key_mask: jax.Array | None = None, dropout_rate: float = 0.0,
                             dropout_rng: jax.Array | None = None, implementation: str | None = None) -> jax.Array:
  """Softmax attention within blocks of `block_size` positions (see the module docstring); the output has the shape
  and dtype of `q`."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {OP} implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  return block_diagonal_attention_reference(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, block_size=block_size, causal=causal,
                                            key_mask=key_mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)


__all__ = ["IMPLEMENTATIONS", "block_diagonal_attention", "block_diagonal_attention_reference"]
