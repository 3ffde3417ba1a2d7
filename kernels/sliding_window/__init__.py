"""Sliding-window softmax attention: query t attends to keys s with `t - window < s <= t` (causal) or
`|t - s| < window` (non-causal); `key_mask` (bool `[batch, keys]`, True = a real key) excludes padded keys.

Implementations (the op template of docs/architecture.md "Functional cores"): "reference" (`reference.py`) builds
the dense `[L, L]` mask (ground truth); "xla" (`xla.py`) works in chunks of `window` positions, each query chunk
scoring only its own and the neighbouring key chunks, so memory is `O(L * window)`; None is "xla" on every platform
(no Pallas kernel for this op yet: "pallas" and "interpret" are refused). Short inputs take the dense path whatever
the implementation: a length no longer than `window` runs the reference (its `[L, L]` is at most `[window, window]`,
less than the chunked form's one padded chunk scoring two). Softmax in float32; a query with no allowed key (only
possible at padded positions) gets 0.
"""

from __future__ import annotations

import jax

from kernels.sliding_window.reference import sliding_window_attention_reference
from kernels.sliding_window.xla import sliding_window_attention_xla

IMPLEMENTATIONS = ("reference", "xla", None)
OP = "sliding_window_attention"


def sliding_window_attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, *, window: int,
                             causal: bool, key_mask: jax.Array | None = None, scale: float | None = None,
                             implementation: str | None = None) -> jax.Array:
  """Softmax attention restricted to a window of `window` positions (see module docstring)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {OP} implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window=}")
  kw = dict(window=window, causal=causal, key_mask=key_mask, scale=scale)
  if implementation == "reference" or q_BxLxHxD.shape[1] <= window:  # short inputs: dense (module docstring)
    return sliding_window_attention_reference(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, **kw)
  return sliding_window_attention_xla(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, **kw)


__all__ = ["IMPLEMENTATIONS", "sliding_window_attention", "sliding_window_attention_reference",
           "sliding_window_attention_xla"]
