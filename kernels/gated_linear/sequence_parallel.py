"""Gated linear attention with the length sharded over the "sequence" mesh axis: state passing with decayed prefixes.

Each device runs the chunked core on its shard from a zero state, giving its outputs, its final state `S_j` and its
total log-decay `G_j = sum g` over the shard (`[B, H]` or `[B, H, K]`). One all-gather shares `(S_j, G_j)`; device i
enters with `S_in = sum_{j < i} exp(G_{j+1} + ... + G_{i-1}) S_j` (every exponent <= 0) and adds
`(q_t * exp(cumsum g up to t)) S_in` to its outputs: exact, since the output is linear in the entering state.
Communication per call: `n * B * H * K * (V + 1)` floats per device, independent of the length. Packed sequences
(`segment_ids`) are not sharded by this form (the layers pass none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import sequence
from kernels.gated_linear.xla import DEFAULT_CHUNK, record_form


def gated_linear_sequence_parallel(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxV: jax.Array,
                                   log_decay: jax.Array, *, chunk_size: int = DEFAULT_CHUNK,
                                   key_mask: jax.Array | None = None, implementation: str | None = None,
                                   ctx: sequence.SequenceMesh | None = None) -> jax.Array:
  """`kernels.gated_linear.gated_linear_attention` of length-sharded inputs over `ctx` (default: the active sequence
  mesh); same values and gradients. A length the mesh does not divide is padded with dropped tokens."""
  from kernels.gated_linear import gated_linear_attention, mask_tokens  # pylint: disable=g-import-not-at-top

  ctx = ctx or sequence.active()
  if ctx is None:
    raise ValueError("gated_linear_sequence_parallel needs a sequence mesh with mesh.sequence > 1")
  k_BxLxHxK, log_decay = mask_tokens(k_BxLxHxK, log_decay, key_mask)
  b, length = q_BxLxHxK.shape[:2]
  pad = -length % ctx.size
  if pad:  # zero keys and zero log-decays: the padding neither writes nor decays
    widths = lambda x: ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)  # noqa: E731
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, log_decay = (jnp.pad(x, widths(x)) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxV,
                                                                                  log_decay))
  record_form("gated_linear_attention", "per-shard states all-gathered, decayed prefixes "
                                        "(kernels/gated_linear/sequence_parallel.py)")
  axis, f32 = ctx.axis, jnp.float32
  per_key = log_decay.ndim == 4

  def body(q, k, v, g):
    out, state = gated_linear_attention(q, k, v, g, chunk_size=chunk_size, return_state=True,
                                        implementation=implementation)
    g = g.astype(f32)
    states = jax.lax.all_gather(state, axis)  # [n, B, H, K, V]
    totals = jax.lax.all_gather(jnp.sum(g, axis=1), axis)  # [n, B, H(, K)]
    me = jax.lax.axis_index(axis)
    idx = jnp.arange(ctx.size)
    # Decay from the end of shard j to the start of shard `me`: exp(sum_{j < m < me} G_m), only for j < me.
    between = jnp.cumsum(totals, axis=0)
    before_me = jnp.sum(jnp.where((idx < me).reshape((-1,) + (1,) * (totals.ndim - 1)), totals, 0.0), axis=0)
    expo = before_me[None] - between  # [n, ...]: sum_{m <= me-1} G_m - sum_{m <= j} G_m
    earlier = (idx < me).reshape((-1,) + (1,) * (totals.ndim - 1))
    weight = jnp.where(earlier, jnp.exp(jnp.where(earlier, expo, 0.0)), 0.0)  # [n, B, H(, K)]
    w = weight[..., None] if per_key else weight[..., None, None]
    s_in = jnp.sum(w * states, axis=0)  # [B, H, K, V]
    cum = jnp.cumsum(g, axis=1)
    q_in = q.astype(f32) * (jnp.exp(cum) if per_key else jnp.exp(cum)[..., None])
    return (out.astype(f32) + jnp.einsum("blhk,bhkv->blhv", q_in, s_in)).astype(v.dtype)

  spec = P(ctx.batch_axis(b), axis, None, None)
  g_spec = P(ctx.batch_axis(b), axis, None, None) if per_key else P(ctx.batch_axis(b), axis, None)
  out = sequence.shard_map(body, ctx, in_specs=(spec, spec, spec, g_spec), out_specs=spec)(
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, log_decay)
  return out[:, :length]


__all__ = ["gated_linear_sequence_parallel"]
