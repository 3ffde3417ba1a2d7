"""Sliding-window softmax attention: query t attends to keys s with `t - window < s <= t` (causal) or
`|t - s| < window` (non-causal); `key_mask` (bool `[batch, keys]`, True = a real key) excludes padded keys.

Implementations (the op template of docs/architecture.md "Functional cores"): "reference" (`reference.py`) builds
the dense `[L, L]` mask (ground truth); "xla" (`xla.py`) works in chunks of `window` positions, each query chunk
scoring only its own and the neighbouring key chunks, so memory is `O(L * window)`; None is "xla" on every platform
(no Pallas kernel for this op yet: "pallas" and "interpret" are refused). Short inputs take the dense path whatever
the implementation: a length no longer than `window` runs the reference (its `[L, L]` is at most `[window, window]`,
less than the chunked form's one padded chunk scoring two); `plan` makes that choice once per call. Softmax in
float32; a query with no allowed key (only possible at padded positions) gets 0.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from kernels.sliding_window.reference import sliding_window_attention_reference
from kernels.sliding_window.xla import sliding_window_attention_xla

IMPLEMENTATIONS = ("reference", "xla", None)
OP = "sliding_window_attention"


@dataclasses.dataclass(frozen=True)
class Plan:
  """One call's plan (`plan`, made once by the entry): the checked options and the form that runs, with why."""

  form: str  # "reference" or "xla"
  why: str
  window: int
  causal: bool
  scale: float | None


def plan(q_BxLxHxD: jax.Array, *, window: int, causal: bool, scale: float | None = None,
         implementation: str | None = None) -> Plan:
  """Checks the options once and picks the form: the dense reference when asked, or for a length no longer than
  `window` (module docstring); the chunked XLA form otherwise."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {OP} implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  if not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"window must be >= 1, got {window=}")
  if implementation == "reference":
    form, why = "reference", "implementation='reference'"
  elif q_BxLxHxD.shape[1] <= window:
    form, why = "reference", f"length {q_BxLxHxD.shape[1]} <= {window=}: one dense block is smaller than a chunk"
  else:
    form, why = "xla", "chunks of the window"
  return Plan(form=form, why=why, window=int(window), causal=bool(causal),
              scale=None if scale is None else float(scale))


def sliding_window_attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, *, window: int,
                             causal: bool, key_mask: jax.Array | None = None, scale: float | None = None,
                             implementation: str | None = None) -> jax.Array:
  """Softmax attention restricted to a window of `window` positions (see module docstring)."""
  p = plan(q_BxLxHxD, window=window, causal=causal, scale=scale, implementation=implementation)
  run = sliding_window_attention_reference if p.form == "reference" else sliding_window_attention_xla
  return run(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, window=p.window, causal=p.causal, key_mask=key_mask, scale=p.scale)


__all__ = ["IMPLEMENTATIONS", "Plan", "plan", "sliding_window_attention", "sliding_window_attention_reference",
           "sliding_window_attention_xla"]
