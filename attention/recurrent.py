"""Shared machinery of the recurrent (linear-attention) family: key masking, the parallel kernel call, and the decode
cache holding a fixed-size state `(S [B, H, F, D], z [B, H, F])`, as a base class of the layers that use them."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from attention.base import AttentionLayer
from attention.ranges import Integer, OneOf
from kernels.linear_attention import IMPLEMENTATIONS as LINEAR_IMPLEMENTATIONS
from kernels import sequence as sequence_lib
from kernels.linear_attention import linear_attention, linear_attention_step
from kernels.linear_attention.sequence_parallel import linear_attention_sequence_parallel


def mask_keys(phi_k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array, mask_BxL: jax.Array | None):
  """Zeroes padded keys' features and values: they then add nothing to the state or the normalizer."""
  if mask_BxL is None:
    return phi_k_BxLxHxF, v_BxLxHxD
  m = mask_BxL[:, :, None, None]
  return jnp.where(m, phi_k_BxLxHxF, 0), jnp.where(m, v_BxLxHxD, 0)


class RecurrentLayer(AttentionLayer):
  """A layer whose mixing is linear attention of feature maps: parallel (`kernels.linear_attention`) or, decoding,
  one step of the recurrence on a state in the `cache` collection (`linear_state`, `linear_norm`, float32) whose size
  does not depend on the sequence length."""

  supports_decode: ClassVar[bool] = True
  fixed_size_cache: ClassVar[bool] = True
  # Every subclass has `chunk_size` and `implementation` fields for `linear_mix` (kernels.linear_attention).
  option_ranges = {"chunk_size": Integer(1), "implementation": OneOf(LINEAR_IMPLEMENTATIONS)}

  def sequence_parallel_form(self) -> str | None:
    return None if self.decode else "state"  # per-shard states, all-gathered (LASP-2)

  def linear_mix(self, phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, mask: jax.Array | None, *, normalize: bool,
                 chunk_size: int, implementation: str | None, eps: float = 1e-6) -> jax.Array:
    """Linear attention of feature-mapped `phi_q`, `phi_k` over `v` (`[B, L, H, *]`), causal as the layer is.

    In decode mode the state is allocated by `init` (which returns the parallel causal output) and advanced by each
    length-1 call. The output has the dtype of `v`.
    """
    phi_k, v = mask_keys(phi_k, v, mask)
    # Features are built in float32; the core takes them in the compute dtype (the Pallas GPU kernel needs bf16/f16)
    # and accumulates states and normalizers in float32 itself.
    phi_q, phi_k = phi_q.astype(v.dtype), phi_k.astype(v.dtype)
    if not self.decode and sequence_lib.active() is not None:
      sequence_lib.log_once(type(self).__name__, "state passing (kernels/linear_attention/sequence_parallel.py)")
      return linear_attention_sequence_parallel(phi_q, phi_k, v, causal=self.causal, normalize=normalize,
                                                chunk_size=chunk_size, implementation=implementation, eps=eps)
    if not self.decode:
      return linear_attention(phi_q, phi_k, v, causal=self.causal, normalize=normalize, chunk_size=chunk_size,
                              implementation=implementation, eps=eps)
    b, length, h, f = phi_q.shape
    initialized = self.has_variable("cache", "linear_state")
    state = self.variable("cache", "linear_state", jnp.zeros, (b, h, f, v.shape[-1]), jnp.float32)
    norm = self.variable("cache", "linear_norm", jnp.zeros, (b, h, f), jnp.float32)
    if not initialized:  # init: the parallel causal output, the cache stays empty
      return linear_attention(phi_q, phi_k, v, causal=True, normalize=normalize, chunk_size=chunk_size,
                              implementation=implementation, eps=eps)
    if length != 1:
      raise ValueError(f"{type(self).__name__}: a decode step takes one position per call, got length {length}")
    (state.value, norm.value), out = linear_attention_step((state.value, norm.value), phi_q[:, 0], phi_k[:, 0],
                                                           v[:, 0], normalize=normalize, eps=eps)
    return out[:, None].astype(v.dtype)
