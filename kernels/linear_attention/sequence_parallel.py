"""Linear attention with the length sharded over the "sequence" mesh axis (LASP-2 style state passing).

Each device reduces its own chunk to the fixed-size state `S_j = sum phi(k) v^T [B, H, F, D]`, `z_j = sum phi(k)
[B, H, F]`; one all-gather along the sequence shares them. A query on device i reads its own chunk's part, which the
public entry `kernels.linear_attention.linear_attention` computes with the layer's `implementation` and `chunk_size`
(chunked scan / Pallas kernels, unnormalized: causal within the chunk, or the whole chunk), plus the other devices'
states: those before it (causal) or all others (non-causal). The normalizer is a (cumulative) sum of phi(k) the same
way. So an explicit `implementation="pallas"` runs the kernels on every shard's own work; nothing falls back.
Communication per call: the all-gather of n states, `n * B * H * F * (D + 1)` floats per device, independent of the
length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import sequence
from kernels.linear_attention.reference import DEFAULT_EPS


def linear_attention_sequence_parallel(q_BxLxHxF: jax.Array, k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array, *,
                                       causal: bool, normalize: bool = True, chunk_size: int = 64,
                                       implementation: str | None = None, eps: float = DEFAULT_EPS,
                                       ctx: sequence.SequenceMesh | None = None) -> jax.Array:
  """`kernels.linear_attention.linear_attention` of length-sharded inputs over `ctx` (default: the active sequence
  mesh); same values and gradients. A length mesh.sequence does not divide is padded with zero keys (which add
  nothing to any state) and the padded outputs are dropped."""
  from kernels.linear_attention import linear_attention  # pylint: disable=g-import-not-at-top  (package entry)

  ctx = ctx or sequence.active()
  if ctx is None:
    raise ValueError("linear_attention_sequence_parallel needs a sequence mesh with mesh.sequence > 1")
  b, length = q_BxLxHxF.shape[:2]
  pad = -length % ctx.size
  if pad:
    q_BxLxHxF, k_BxLxHxF, v_BxLxHxD = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                       for t in (q_BxLxHxF, k_BxLxHxF, v_BxLxHxD))
  axis = ctx.axis
  f32 = jnp.float32
  sequence.ran("linear_attention", "state",
               f"per-shard states all-gathered, each shard's own part by implementation={implementation!r} "
               f"(kernels/linear_attention/sequence_parallel.py)")

  def body(q, k, v):
    s_BxHxFxD = jnp.einsum("blhf,blhd->bhfd", k.astype(f32), v.astype(f32))
    z_BxHxF = jnp.einsum("blhf->bhf", k.astype(f32))
    states = jax.lax.all_gather(s_BxHxFxD, axis)  # [n, B, H, F, D]
    norms = jax.lax.all_gather(z_BxHxF, axis)
    me = jax.lax.axis_index(axis)
    # The other shards' states a query reads: the earlier ones (causal) or all but its own (non-causal).
    others = (jnp.arange(ctx.size) < me) if causal else (jnp.arange(ctx.size) != me)
    s_others = jnp.einsum("n,nbhfd->bhfd", others.astype(f32), states)
    z_others = jnp.einsum("n,nbhf->bhf", others.astype(f32), norms)
    own = linear_attention(q, k, v, causal=causal, normalize=False, chunk_size=chunk_size,
                           implementation=implementation, eps=eps).astype(f32)
    num = own + jnp.einsum("blhf,bhfd->blhd", q.astype(f32), s_others)
    z_own = jnp.cumsum(k.astype(f32), axis=1) if causal else jnp.broadcast_to(z_BxHxF[:, None], k.shape).astype(f32)
    den = jnp.einsum("blhf,blhf->blh", q.astype(f32), z_own) + jnp.einsum("blhf,bhf->blh", q.astype(f32), z_others)
    out = num / (den[..., None] + eps) if normalize else num
    return out.astype(v.dtype)

  spec = P(ctx.batch_axis(b), axis, None, None)
  out = sequence.shard_map(body, ctx, in_specs=(spec, spec, spec), out_specs=spec)(q_BxLxHxF, k_BxLxHxF, v_BxLxHxD)
  return out[:, :length]


__all__ = ["linear_attention_sequence_parallel"]
