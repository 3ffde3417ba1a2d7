"""Linear attention with the length sharded over the "sequence" mesh axis (LASP-2 style state passing).

Each device reduces its own chunk to the fixed-size state `S_j = sum phi(k) v^T [B, H, F, D]`, `z_j = sum phi(k)
[B, H, F]`; one all-gather along the sequence shares them. Non-causal: every query reads the total `sum_j S_j`.
Causal: a query on device i reads the prefix `sum_{j < i} S_j` plus its own chunk's causal part, which the public
entry `kernels.linear_attention.linear_attention` computes (chunked scan / Pallas kernels, unnormalized); the
intra-chunk normalizer is a cumulative sum of phi(k). Communication per call: the all-gather of n states,
`n * B * H * F * (D + 1)` floats per device, independent of the length.
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

  def body(q, k, v):
    s_BxHxFxD = jnp.einsum("blhf,blhd->bhfd", k.astype(f32), v.astype(f32))
    z_BxHxF = jnp.einsum("blhf->bhf", k.astype(f32))
    if not causal:
      s_total, z_total = jax.lax.psum(s_BxHxFxD, axis), jax.lax.psum(z_BxHxF, axis)
      num = jnp.einsum("blhf,bhfd->blhd", q.astype(f32), s_total)
      den = jnp.einsum("blhf,bhf->blh", q.astype(f32), z_total)
    else:
      states = jax.lax.all_gather(s_BxHxFxD, axis)  # [n, B, H, F, D]
      norms = jax.lax.all_gather(z_BxHxF, axis)
      earlier = (jnp.arange(ctx.size) < jax.lax.axis_index(axis)).astype(f32)
      s_prefix = jnp.einsum("n,nbhfd->bhfd", earlier, states)
      z_prefix = jnp.einsum("n,nbhf->bhf", earlier, norms)
      intra = linear_attention(q, k, v, causal=True, normalize=False, chunk_size=chunk_size,
                               implementation=implementation, eps=eps).astype(f32)
      num = intra + jnp.einsum("blhf,bhfd->blhd", q.astype(f32), s_prefix)
      den = jnp.einsum("blhf,blhf->blh", q.astype(f32), jnp.cumsum(k.astype(f32), axis=1)) + \
          jnp.einsum("blhf,bhf->blh", q.astype(f32), z_prefix)
    out = num / (den[..., None] + eps) if normalize else num
    return out.astype(v.dtype)

  spec = P(ctx.batch_axis(b), axis, None, None)
  out = sequence.shard_map(body, ctx, in_specs=(spec, spec, spec), out_specs=spec)(q_BxLxHxF, k_BxLxHxF, v_BxLxHxD)
  return out[:, :length]


__all__ = ["linear_attention_sequence_parallel"]
