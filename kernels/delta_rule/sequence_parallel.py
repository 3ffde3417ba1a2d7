"""The (gated) delta rule with the length sharded over the "sequence" mesh axis: the shards' matrix transitions
composed across devices (exact).

A shard maps its entering state affinely: `S_out = P_j S_in + Z_j`, with `P_j [K, K]` the product of its tokens'
`alpha (I - beta k k^T)` and `Z_j` its final state from zero. One core call per shard computes both, as the final
state of the value block `[v | 0]` entered with `[0 | I]` (the transition acts on every value column alike). One
all-gather shares `(P_j, Z_j)`; device i composes `S_in_i = P_{i-1}(... (P_0 0 + Z_0) ...) + Z_{i-1}` (n - 1 small
matmuls) and runs the core again from `S_in_i` for its outputs. Cost: two core calls per shard (the second with the
state) plus `n * B * H * K * (K + V)` floats gathered per device, independent of the length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import sequence
from kernels.gated_linear.xla import record_form
from kernels.delta_rule.xla import DEFAULT_CHUNK


def delta_rule_sequence_parallel(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxV: jax.Array,
                                 beta_BxLxH: jax.Array, log_decay_BxLxH: jax.Array | None = None, *,
                                 chunk_size: int = DEFAULT_CHUNK, key_mask: jax.Array | None = None,
                                 implementation: str | None = None,
                                 ctx: sequence.SequenceMesh | None = None) -> jax.Array:
  """`kernels.delta_rule.delta_rule_attention` of length-sharded inputs over `ctx` (default: the active sequence
  mesh); same values and gradients. A length the mesh does not divide is padded with dropped tokens."""
  from kernels.delta_rule import delta_rule_attention, mask_tokens  # pylint: disable=g-import-not-at-top

  ctx = ctx or sequence.active()
  if ctx is None:
    raise ValueError("delta_rule_sequence_parallel needs a sequence mesh with mesh.sequence > 1")
  if log_decay_BxLxH is None:
    log_decay_BxLxH = jnp.zeros(beta_BxLxH.shape, jnp.float32)
  beta_BxLxH, log_decay_BxLxH = mask_tokens(beta_BxLxH, log_decay_BxLxH, key_mask)
  b, length, h, dk = q_BxLxHxK.shape
  dv = v_BxLxHxV.shape[-1]
  pad = -length % ctx.size
  if pad:  # beta = 0 and zero log-decays: the padding neither writes nor decays
    widths = lambda x: ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)  # noqa: E731
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, beta_BxLxH, log_decay_BxLxH = (
        jnp.pad(x, widths(x)) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, beta_BxLxH, log_decay_BxLxH))
  record_form("delta_rule_attention", "per-shard affine maps S -> P S + Z all-gathered and composed "
                                      "(kernels/delta_rule/sequence_parallel.py)")
  axis, f32 = ctx.axis, jnp.float32

  def body(q, k, v, beta, g):
    bl = q.shape[0]
    v_aug = jnp.concatenate([v.astype(f32), jnp.zeros((*v.shape[:3], dk), f32)], axis=-1)
    s0 = jnp.concatenate([jnp.zeros((bl, h, dk, dv), f32),
                          jnp.broadcast_to(jnp.eye(dk, dtype=f32), (bl, h, dk, dk))], axis=-1)
    _, zp = delta_rule_attention(q, k, v_aug, beta, g, chunk_size=chunk_size, initial_state=s0, return_state=True,
                                 implementation=implementation)
    zs = jax.lax.all_gather(zp[..., :dv], axis)  # [n, B, H, K, V]
    ps = jax.lax.all_gather(zp[..., dv:], axis)  # [n, B, H, K, K]
    me = jax.lax.axis_index(axis)
    s_in = jnp.zeros((bl, h, dk, dv), f32)
    for j in range(ctx.size - 1):  # compose the earlier shards' transitions, in order
      s_in = jnp.where(j < me, jnp.einsum("bhkj,bhjv->bhkv", ps[j], s_in) + zs[j], s_in)
    return delta_rule_attention(q, k, v, beta, g, chunk_size=chunk_size, initial_state=s_in,
                                implementation=implementation)

  spec = P(ctx.batch_axis(b), axis, None, None)
  g_spec = P(ctx.batch_axis(b), axis, None)
  out = sequence.shard_map(body, ctx, in_specs=(spec, spec, spec, g_spec, g_spec), out_specs=spec)(
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, beta_BxLxH, log_decay_BxLxH)
  return out[:, :length]


__all__ = ["delta_rule_sequence_parallel"]
