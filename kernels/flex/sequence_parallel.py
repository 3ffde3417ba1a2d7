"""Ring flex attention: `kernels.flex.flex_attention` with the length sharded over the "sequence" mesh axis.

Each device keeps its queries and passes its key/value block around the ring (`jax.lax.ppermute`, n hops in one scan),
in the zig-zag layout of the softmax ring (`kernels/softmax/sequence_parallel.py`: device i holds chunks i and 2n-1-i
of 2n, so a causal mask leaves every device the same work). Each hop is one dense block of `[B, H, 2C, 2C]` scores
(the device's two query chunks against the visiting two key chunks) on which `score_mod` and `mask_mod` are evaluated at GLOBAL positions (the
chunks' global indices and the global batch index), key padding honoured, attention dropout drawn from the shared
counter hash at the global (batch * heads + head, query, key): the values equal the unsharded call's. A hop whose
mask allows nothing (a sliding window's far hops) is skipped at run time (`lax.cond` on the evaluated mask: the
offsets depend on the traced ring position, so nothing is skipped statically). Not skipped: the empty half of a hop
(a causal mask computes all four chunk pairs of every hop, about twice the causal work; four conditional pairs per
hop cost three times the compile time in the tests). The hops' normalized `(out, lse)` are merged by log-sum-exp
(`kernels.softmax.sequence_parallel.merge`).

Gradients: autodiff of the ring (ppermute transposes to the reverse hop), each hop under `jax.checkpoint`, so the
backward pass recomputes a hop's block and keeps per hop only the scan carry (the running `(out, lse)` and the
visiting key/value block: O(L) per device, never O(L^2)). Arrays the functions close over are explicit, replicated
inputs of the shard_map (`explicit_mask_mod` / `explicit_score_mod` of the XLA form): a document mask's ids (O(B L)
ints, all-gathered) and a learned bias table, whose gradient is summed over the devices by the shard_map transpose.

Only this XLA form runs per hop: an explicit `implementation="pallas"` / `"interpret"` is refused (`refusal`), never
dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import sequence
from kernels.common import MASK_VALUE, dropout_keep, dropout_seed
from kernels.flex.xla import explicit_mask_mod, explicit_score_mod
from kernels.softmax.sequence_parallel import from_zigzag, masked_softmax, merge, to_zigzag  # the same layout

KERNEL_IMPLEMENTATIONS = ("pallas", "interpret")
DETAIL = "dense block pairs with mask_mod/score_mod at global positions (kernels/flex/sequence_parallel.py)"


def refusal(implementation: str | None) -> str | None:
  """Why the flex ring cannot run these options (None: it can): one line naming the option and mesh.sequence."""
  if implementation in KERNEL_IMPLEMENTATIONS:
    return (f"flex implementation={implementation!r} with mesh.sequence > 1: the ring runs the XLA form per block "
            f"pair (the Pallas kernels take no global offsets yet); use implementation=None or 'xla', or "
            f"mesh.sequence=1")
  return None


def block_pair(q_BxCxHxD, k_BxCxHxD, v_BxCxHxD, key_mask_BxC, *, mask_fn, score_fn, mask_consts, params, scale,
               rate, seed, batch_offset, q_pos, k_pos, heads_total):
  """One block pair: `(out [B, Cq, H, D] float32 normalized within the pair, lse [B, H, Cq])`;
  `q_pos` int32 `[Cq]` and `k_pos` `[Ck]` are the rows' and keys' global positions. A row with no allowed key has
  `lse = MASK_VALUE` and `out = 0` (it weighs nothing in the merge). An empty pair skips the score work."""
  b, cq, h, _ = q_BxCxHxD.shape
  ck = k_BxCxHxD.shape[1]
  bi = (batch_offset + jnp.arange(b, dtype=jnp.int32))[:, None, None, None]
  hi = jnp.arange(h, dtype=jnp.int32)[None, :, None, None]
  qi = jnp.asarray(q_pos, jnp.int32).reshape(1, 1, cq, 1)
  ki = jnp.asarray(k_pos, jnp.int32).reshape(1, 1, 1, ck)
  allowed = jnp.broadcast_to(key_mask_BxC[:, None, None, :], (b, h, cq, ck))
  if mask_fn is not None:
    allowed = allowed & jnp.asarray(mask_fn(bi, hi, qi, ki, *mask_consts), bool)

  def compute(q, k, v, params):
    s = jnp.einsum("blhd,bshd->bhls", q, k, preferred_element_type=jnp.float32) * scale
    if score_fn is not None:
      s = jnp.asarray(score_fn(s, bi, hi, qi, ki, *params), jnp.float32)
    w, lse = masked_softmax(s, allowed)
    if rate:
      keep = dropout_keep(seed, bi * heads_total + hi, qi, ki, rate)
      w = jnp.where(keep, w / (1.0 - rate), 0.0)
    return jnp.einsum("bhls,bshd->blhd", w, v.astype(jnp.float32)), lse

  def empty(q, k, v, params):
    del k, v, params
    return jnp.zeros(q.shape, jnp.float32), jnp.full((b, h, cq), MASK_VALUE, jnp.float32)

  return jax.lax.cond(jnp.any(allowed), compute, empty, q_BxCxHxD, k_BxCxHxD, v_BxCxHxD, params)


def flex_ring_attention(q_BxLxHxD: jax.Array, k_BxLxKxD: jax.Array, v_BxLxKxD: jax.Array, *, mask_mod=None,
                        score_mod=None, key_mask: jax.Array | None = None, scale: float | None = None,
                        dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                        implementation: str | None = None, ctx: sequence.SequenceMesh | None = None) -> jax.Array:
  """Flex attention of length-sharded q, k, v `[B, L, H, D]` (k, v may have fewer heads: grouped-query attention,
  repeated to the query heads) over `ctx` (default `sequence.active()`); equal to `kernels.flex.flex_attention` on
  one device (values and gradients, dropout included). A length 2 * mesh.sequence does not divide is padded with
  masked keys."""
  ctx = ctx or sequence.active()
  if ctx is None:
    raise ValueError("flex_ring_attention needs a sequence mesh (kernels.sequence.use_mesh) with mesh.sequence > 1")
  if (reason := refusal(implementation)) is not None:
    raise ValueError(reason.replace("mesh.sequence > 1", f"mesh.sequence={ctx.size}", 1))
  b, length, h, d = q_BxLxHxD.shape
  kv_heads = k_BxLxKxD.shape[2]
  if h % kv_heads or v_BxLxKxD.shape[2] != kv_heads or k_BxLxKxD.shape[1] != length:
    raise ValueError(f"flex_ring_attention: k, v must be [batch, {length}, heads dividing {h}, head_dim]; got "
                     f"{k_BxLxKxD.shape}, {v_BxLxKxD.shape}")
  if kv_heads != h:
    k_BxLxKxD, v_BxLxKxD = (jnp.repeat(t, h // kv_heads, axis=2) for t in (k_BxLxKxD, v_BxLxKxD))
  n = ctx.size
  scale = float(d ** -0.5 if scale is None else scale)
  use_dropout = dropout_rate > 0.0 and dropout_rng is not None
  rate = float(dropout_rate) if use_dropout else 0.0
  seed = dropout_seed(dropout_rng) if use_dropout else jnp.zeros((), jnp.int32)
  mask = jnp.ones((b, length), bool) if key_mask is None else jnp.asarray(key_mask, bool)
  pad = -length % (2 * n)
  if pad:
    q_BxLxHxD, k_BxLxKxD, v_BxLxKxD = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                       for t in (q_BxLxHxD, k_BxLxKxD, v_BxLxKxD))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  c = (length + pad) // (2 * n)
  batch_axis = ctx.batch_axis(b)
  bl = b // ctx.mesh.shape[batch_axis] if batch_axis else b
  # The functions at the block's index shapes, their closed-over arrays hoisted into explicit inputs.
  i32 = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
  idx = (i32(bl, 1, 1, 1), i32(1, h, 1, 1), i32(1, 1, 2 * c, 1), i32(1, 1, 1, 2 * c))
  mask_fn, mask_consts = explicit_mask_mod(mask_mod, idx)
  score_fn, params = explicit_score_mod(score_mod, (jnp.zeros((bl, h, 2 * c, 2 * c), jnp.float32), *idx))
  mask_consts, params = tuple(mask_consts), tuple(params)
  sequence.ran("flex_attention", "ring", DETAIL)
  spec4, spec2 = P(batch_axis, ctx.axis, None, None), P(batch_axis, ctx.axis)
  rep = lambda xs: tuple(P() for _ in xs)  # noqa: E731

  def body(q, k, v, mask, seed, mask_consts, params):
    me = jax.lax.axis_index(ctx.axis)
    batch_offset = jnp.asarray(jax.lax.axis_index(batch_axis) * q.shape[0] if batch_axis else 0, jnp.int32)
    q, k, v, mask = (to_zigzag(t, ctx.axis, n) for t in (q, k, v, mask))
    chunk = lambda device, half: jnp.where(half == 0, device, 2 * n - 1 - device) * c  # noqa: E731

    def positions(device):  # global positions of a device's two zig-zag chunks
      return jnp.concatenate([chunk(device, 0) + jnp.arange(c, dtype=jnp.int32),
                              chunk(device, 1) + jnp.arange(c, dtype=jnp.int32)])

    def hop(acc, k, v, mask, src):
      new = block_pair(q, k, v, mask, mask_fn=mask_fn, score_fn=score_fn, mask_consts=mask_consts, params=params,
                       scale=scale, rate=rate, seed=seed, batch_offset=batch_offset, q_pos=positions(me),
                       k_pos=positions(src), heads_total=h)
      return merge(acc, new)

    hop = jax.checkpoint(hop)
    acc = (jnp.zeros(q.shape, jnp.float32), jnp.full((q.shape[0], h, 2 * c), MASK_VALUE, jnp.float32))
    perm = [(s, (s + 1) % n) for s in range(n)]

    # All n hops in one scan (the hop is traced and compiled once; the last hop's rotation is one transfer more).
    def step(carry, i):
      acc, k, v, mask = carry
      acc = hop(acc, k, v, mask, (me - i) % n)
      k, v, mask = (jax.lax.ppermute(t, ctx.axis, perm) for t in (k, v, mask))
      return (acc, k, v, mask), None

    (acc, _, _, _), _ = jax.lax.scan(step, (acc, k, v, mask), jnp.arange(n))
    return from_zigzag(acc[0].astype(q.dtype), ctx.axis, n)

  out = sequence.shard_map(body, ctx, in_specs=(spec4, spec4, spec4, spec2, P(), rep(mask_consts), rep(params)),
                           out_specs=spec4)(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, mask, seed, mask_consts, params)
  return out[:, :length]


__all__ = ["KERNEL_IMPLEMENTATIONS", "block_pair", "flex_ring_attention", "refusal"]
