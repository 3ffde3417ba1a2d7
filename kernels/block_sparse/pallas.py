"""Pallas driver of block-sparse attention: the layout as a flex block mask (`tables.kernel_plan`, made once by the
entry) through flex's Pallas kernels (`kernels.flex.pallas`; issue 33, one kernel family: this op keeps no kernels
of its own)."""

from __future__ import annotations

import jax

from kernels.block_sparse.tables import KernelPlan
from kernels.flex.pallas import flex_attention_kernel


def block_sparse_attention_kernels(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                                   kernel_plan: KernelPlan, *, scale: float | None = None,
                                   key_mask: jax.Array | None = None, dropout_rate: float = 0.0,
                                   dropout_seed: jax.Array | None = None, backend: str = "tpu",
                                   interpret=False) -> jax.Array:
  """Block-sparse attention on flex's Pallas kernels of `backend`, `[B, L, H, D]` in and out: the layout is the
  plan's block mask (`tables.kernel_plan`, made once by the entry, which checked the call: neither this driver nor
  flex's, `flex_attention_kernel`, checks again); `interpret` (True or the backend's interpret params) runs the
  kernels on CPU. Dropout counters are flex's, which are this op's (batch * heads + head, query position, key
  position)."""
  bm = kernel_plan.block_mask
  return flex_attention_kernel(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, bm, mask_mod=bm.mask_mod,
                               bitmaps=kernel_plan.bitmaps, key_mask=key_mask, scale=scale,
                               dropout_rate=dropout_rate, dropout_seed=dropout_seed, backend=backend,
                               interpret=interpret)


__all__ = ["block_sparse_attention_kernels"]
