"""Ring attention: exact softmax attention with the length sharded over the "sequence" mesh axis.

Each device keeps its queries and passes its key/value block around the ring (`jax.lax.ppermute`, n - 1 hops
forward); every (query block, key block) pair gives a per-block `(out, lse)` (`block_attention`) and the online-
softmax merge `out = sum_j exp(lse_j - LSE) out_j` makes the exact result. The backward pass (custom_vjp) runs the
ring again: each hop recomputes its block pair (the block primitive's own vjp, with cotangents of both its out and its
lse) and the key/value gradients travel with their block, n hops, back to its owner; nothing of size L^2 or of the
whole length is kept on any device.

Causal balance: the sequence is cut into 2n chunks and device i holds chunks i and 2n-1-i (zig-zag, moved there from
the contiguous GSPMD layout by two ppermutes and back after). Then on every hop after the first each device does the
same two chunk pairs: from an earlier device both its query chunks against the block's first chunk, from a later
device its second query chunk against both of the block's chunks (`lax.cond` on the traced source index).

Global positions (`q_offset`, `k_offset`) drive the causal mask and the attention-dropout counter hash
(`kernels.common.dropout_keep`, keyed by (seed, global batch * heads + head, query, key)), so masks and dropout equal
the unsharded call's. The block function is the flash block primitive (`kernels.softmax.xla.flash_block`: chunked
online softmax, its own custom_vjp taking cotangents of out and lse); `block_attention` is the dense form of the same
signature (plus the global batch offset of the dropout counters), used with dropout when the batch is split over
"data".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kernels import sequence
from kernels.common import MASK_VALUE, dropout_keep, dropout_seed
from kernels.softmax.xla import flash_block


def flash_block_fn(q, k, v, *, batch_offset, **kwargs):
  """`kernels.softmax.xla.flash_block` as the ring's block function (its dropout counters use the local batch index,
  so the ring calls it only where the batch is not split over devices or dropout is off)."""
  del batch_offset
  return flash_block(q, k, v, **kwargs)


def block_attention(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array, *, key_mask: jax.Array | None,
                    causal: bool, scale: float, dropout_rate: float = 0.0, seed: jax.Array | None = None,
                    q_offset=0, k_offset=0, batch_offset=0,
                    alibi_slopes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One block pair: `(out [B, L, H, D] float32, lse [B, H, L] float32)`, `out` normalized within the block.

  `key_mask [B, S]` (True = real key); positions are `q_offset + arange(L)`, `k_offset + arange(S)` (global);
  `batch_offset` is the global index of the first row (dropout hash). A row with no allowed key has `lse = MASK_VALUE`
  and `out = 0`, so it weighs nothing in the merge. Dropout acts on the normalized weights: the merged result is then
  dropout of the global weights (the merge only rescales each block).
  """
  b, lq, h, _ = q_BxLxHxD.shape
  ls = k_BxSxHxD.shape[1]
  s_BxHxLxS = jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k_BxSxHxD, preferred_element_type=jnp.float32) * scale
  q_pos = q_offset + jnp.arange(lq, dtype=jnp.int32)
  k_pos = k_offset + jnp.arange(ls, dtype=jnp.int32)
  if alibi_slopes is not None:
    s_BxHxLxS = s_BxHxLxS - alibi_slopes[None, :, None, None] * jnp.abs(q_pos[:, None] - k_pos[None, :])
  allowed = jnp.ones((1, 1, lq, ls), bool)
  if key_mask is not None:
    allowed = allowed & key_mask[:, None, None, :]
  if causal:
    allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None, None]
  s_BxHxLxS = jnp.where(allowed, s_BxHxLxS, MASK_VALUE)
  m = jax.lax.stop_gradient(jnp.max(s_BxHxLxS, axis=-1, keepdims=True))
  p = jnp.where(allowed, jnp.exp(s_BxHxLxS - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  lse_BxHxL = jnp.where(denom[..., 0] > 0, m[..., 0] + jnp.log(jnp.maximum(denom[..., 0], 1e-30)), MASK_VALUE)
  w = p / jnp.maximum(denom, 1e-30)
  if dropout_rate > 0.0 and seed is not None:
    bh = (batch_offset + jnp.arange(b, dtype=jnp.int32))[:, None] * h + jnp.arange(h, dtype=jnp.int32)[None, :]
    keep = dropout_keep(seed, bh[:, :, None, None], q_pos[None, None, :, None], k_pos[None, None, None, :],
                        dropout_rate)
    w = jnp.where(keep, w / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhls,bshd->blhd", w, v_BxSxHxD.astype(jnp.float32))
  return out, lse_BxHxL


def merge(acc: tuple[jax.Array, jax.Array], new: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Online-softmax merge of two normalized `(out [B, L, H, D], lse [B, H, L])` partial results."""
  (o1, l1), (o2, l2) = acc, new
  lse = jnp.logaddexp(l1, l2)
  w1 = jnp.swapaxes(jnp.exp(l1 - lse), 1, 2)[..., None]
  w2 = jnp.swapaxes(jnp.exp(l2 - lse), 1, 2)[..., None]
  return o1 * w1 + o2 * w2, lse


# ---- the zig-zag layout --------------------------------------------------------------------------------------------

def _owner(chunk: int, n: int) -> int:
  """The device holding global chunk `chunk` of 2n in the zig-zag order (device i: chunks i and 2n-1-i)."""
  return chunk if chunk < n else 2 * n - 1 - chunk


def _to_zigzag(x: jax.Array, axis: str, n: int) -> jax.Array:
  """Inside shard_map: local contiguous chunks (2i, 2i+1) of `x [B, 2c, ...]` -> zig-zag chunks (i, 2n-1-i)."""
  c = x.shape[1] // 2
  a, b = x[:, :c], x[:, c:]
  ra = jax.lax.ppermute(a, axis, [(s, _owner(2 * s, n)) for s in range(n)])
  rb = jax.lax.ppermute(b, axis, [(s, _owner(2 * s + 1, n)) for s in range(n)])
  # Device i receives chunk i through `ra` when i is even (an even chunk), else through `rb`.
  even = jax.lax.axis_index(axis) % 2 == 0
  return jnp.concatenate([jnp.where(even, ra, rb), jnp.where(even, rb, ra)], axis=1)


def _from_zigzag(x: jax.Array, axis: str, n: int) -> jax.Array:
  """The inverse of `_to_zigzag`."""
  c = x.shape[1] // 2
  first, second = x[:, :c], x[:, c:]
  even = jax.lax.axis_index(axis) % 2 == 0
  ra, rb = jnp.where(even, first, second), jnp.where(even, second, first)
  a = jax.lax.ppermute(ra, axis, [(_owner(2 * s, n), s) for s in range(n)])
  b = jax.lax.ppermute(rb, axis, [(_owner(2 * s + 1, n), s) for s in range(n)])
  return jnp.concatenate([a, b], axis=1)


# ---- the ring --------------------------------------------------------------------------------------------------------

def _pairs(causal: bool, hop: int):
  """Static chunk pairs `(query half, key half)` a hop computes; for causal hops > 0 two alternatives chosen by
  whether the key block comes from an earlier device."""
  full = [(0, 0), (0, 1), (1, 0), (1, 1)]
  if not causal:
    return full, None
  if hop == 0:
    return [(0, 0), (1, 0), (1, 1)], None  # (0, 1): chunk 2n-1-i is after chunk i
  return [(0, 0), (1, 0)], [(1, 0), (1, 1)]  # earlier source: against its first chunk; later: second queries only


class _Ring:
  """The per-device ring body (inside shard_map): static settings bound once."""

  def __init__(self, *, axis: str, n: int, causal: bool, scale: float, dropout_rate: float, block_fn):
    self.axis, self.n, self.causal, self.scale, self.dropout_rate = axis, n, causal, scale, dropout_rate
    self.block_fn = block_fn

  def chunk_index(self, device, half):
    return jnp.where(half == 0, device, 2 * self.n - 1 - device)

  def block(self, q, k, v, mask, seed, batch_offset, me, src, qh, kh):
    c = q.shape[1] // 2
    return self.block_fn(q[:, qh * c:(qh + 1) * c], k[:, kh * c:(kh + 1) * c], v[:, kh * c:(kh + 1) * c],
                         key_mask=mask[:, kh * c:(kh + 1) * c], causal=self.causal, scale=self.scale,
                         dropout_rate=self.dropout_rate, seed=seed,
                         q_offset=self.chunk_index(me, qh) * c, k_offset=self.chunk_index(src, kh) * c,
                         batch_offset=batch_offset)

  def hop_output(self, pairs, q, k, v, mask, seed, batch_offset, me, src):
    """Merged `(out, lse)` over the 2c local query rows from `pairs` (rows no pair touches: 0, MASK_VALUE)."""
    b, two_c, h, d = q.shape
    c = two_c // 2
    halves = [(jnp.zeros((b, c, h, d), jnp.float32), jnp.full((b, h, c), MASK_VALUE, jnp.float32)) for _ in range(2)]
    for qh, kh in pairs:
      halves[qh] = merge(halves[qh], self.block(q, k, v, mask, seed, batch_offset, me, src, qh, kh))
    return (jnp.concatenate([halves[0][0], halves[1][0]], axis=1),
            jnp.concatenate([halves[0][1], halves[1][1]], axis=2))

  def rotate(self, *xs):
    perm = [(s, (s + 1) % self.n) for s in range(self.n)]
    return tuple(jax.lax.ppermute(x, self.axis, perm) for x in xs)

  def _hop(self, hop: int, src, fn, *args):
    """`fn(pairs, *args)` for the pairs of `hop` (> 0 stands for every later hop; causal: chosen by the source)."""
    pairs, alt = _pairs(self.causal, hop)
    if alt is None:
      return fn(pairs, *args)
    return jax.lax.cond(src < jax.lax.axis_index(self.axis), lambda *a: fn(pairs, *a), lambda *a: fn(alt, *a), *args)

  def forward(self, q, k, v, mask, seed, batch_offset):
    me = jax.lax.axis_index(self.axis)
    b, two_c, h, d = q.shape
    out = lambda pairs, k, v, mask, src: self.hop_output(pairs, q, k, v, mask, seed, batch_offset, me, src)  # noqa
    acc = self._hop(0, me, out, k, v, mask, me)

    # Hops 1..n-1 in a scan: one hop's blocks at a time (an unrolled loop lets XLA keep every hop's scores alive).
    def step(carry, hop):
      acc, k, v, mask = carry
      k, v, mask = self.rotate(k, v, mask)
      src = (me - hop) % self.n
      return (merge(acc, self._hop(1, src, out, k, v, mask, src)), k, v, mask), None

    (acc, _, _, _), _ = jax.lax.scan(step, (acc, k, v, mask), jnp.arange(1, self.n))
    return acc

  def backward(self, q, k, v, mask, seed, batch_offset, out, lse, d_out):
    """Gradients of q, k, v for the cotangent `d_out` of the merged output (`out`, `lse`: the forward's)."""
    me = jax.lax.axis_index(self.axis)
    c = q.shape[1] // 2
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    d_out = d_out.astype(jnp.float32)

    def hop_grads(pairs, k, v, mask, src, dq, dk, dv):
      for qh, kh in pairs:
        qs, ks = slice(qh * c, (qh + 1) * c), slice(kh * c, (kh + 1) * c)
        f = lambda q_, k_, v_: self.block_fn(  # noqa: E731
            q_, k_, v_, key_mask=mask[:, ks], causal=self.causal, scale=self.scale, dropout_rate=self.dropout_rate,
            seed=seed, q_offset=self.chunk_index(me, qh) * c, k_offset=self.chunk_index(src, kh) * c,
            batch_offset=batch_offset)
        (o_p, lse_p), pullback = jax.vjp(f, q[:, qs], k[:, ks], v[:, ks])
        w_BxHxC = jnp.exp(lse_p - lse[:, :, qs])
        w = jnp.swapaxes(w_BxHxC, 1, 2)[..., None]
        do_h = d_out[:, qs]
        d_o_p = w * do_h
        d_lse_p = w_BxHxC * jnp.swapaxes(jnp.sum(do_h * (o_p - out[:, qs]), axis=-1), 1, 2)
        gq, gk, gv = pullback((d_o_p, d_lse_p))
        dq = dq.at[:, qs].add(gq.astype(jnp.float32))
        dk = dk.at[:, ks].add(gk.astype(jnp.float32))
        dv = dv.at[:, ks].add(gv.astype(jnp.float32))
      return dq, dk, dv

    dq, dk, dv = self._hop(0, me, hop_grads, k, v, mask, me, dq, dk, dv)

    def step(carry, hop):
      dq, k, v, mask, dk, dv = carry
      k, v, mask, dk, dv = self.rotate(k, v, mask, dk, dv)
      src = (me - hop) % self.n
      dq, dk, dv = self._hop(1, src, hop_grads, k, v, mask, src, dq, dk, dv)
      return (dq, k, v, mask, dk, dv), None

    (dq, k, v, mask, dk, dv), _ = jax.lax.scan(step, (dq, k, v, mask, dk, dv), jnp.arange(1, self.n))
    # The n-th hop brings each block's key/value gradients home.
    _, _, dk, dv = self.rotate(k, mask, dk, dv)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_local(ring: _Ring, q, k, v, mask, seed, batch_offset):
  return ring.forward(q, k, v, mask, seed, batch_offset)[0].astype(q.dtype)


def _ring_local_fwd(ring, q, k, v, mask, seed, batch_offset):
  out, lse = ring.forward(q, k, v, mask, seed, batch_offset)
  return out.astype(q.dtype), (q, k, v, mask, seed, batch_offset, out, lse)


def _ring_local_bwd(ring, res, d_out):
  q, k, v, mask, seed, batch_offset, out, lse = res
  dq, dk, dv = ring.backward(q, k, v, mask, seed, batch_offset, out, lse, d_out)
  zero = lambda x: np.zeros(np.shape(x), jax.dtypes.float0)  # noqa: E731  (integer / bool inputs)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero(mask), zero(seed), zero(batch_offset)


_ring_local.defvjp(_ring_local_fwd, _ring_local_bwd)


def ring_attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, *,
                   key_mask_BxL: jax.Array | None = None, causal: bool = False, scale: float | None = None,
                   dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                   ctx: sequence.SequenceMesh | None = None, block_fn=None) -> jax.Array:
  """Exact softmax attention of length-sharded q, k, v over `ctx` (default: `sequence.active()`), `[B, L, H, D]`.

  A length that 2 * mesh.sequence does not divide is padded with masked keys (dropped from the output). Dropout (when
  `dropout_rng` is given and `dropout_rate > 0`) is the counter hash keyed by global positions, as in
  `kernels.softmax.softmax_attention`. `block_fn` (default): the flash block primitive, or the dense `block_attention`
  when dropout is on and the batch is split over "data" (flash_block's counters take the local batch index).
  """
  ctx = ctx or sequence.active()
  if ctx is None:
    raise ValueError("ring_attention needs a sequence mesh (kernels.sequence.use_mesh) with mesh.sequence > 1")
  b, length, h, d = q_BxLxHxD.shape
  n = ctx.size
  scale = d ** -0.5 if scale is None else scale
  mask = jnp.ones((b, length), bool) if key_mask_BxL is None else key_mask_BxL.astype(bool)
  pad = -length % (2 * n)
  if pad:
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                       for t in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  use_dropout = dropout_rate > 0.0 and dropout_rng is not None
  seed = dropout_seed(dropout_rng) if use_dropout else jnp.zeros((), jnp.int32)
  batch_axis = ctx.batch_axis(b)
  if block_fn is None:
    block_fn = flash_block_fn
    if use_dropout and batch_axis is not None:
      sequence.log_once("ring_attention", "dense per-block scores: dropout counters need the global batch index, "
                                          "which flash_block does not take")
      block_fn = block_attention
  ring = _Ring(axis=ctx.axis, n=n, causal=causal, scale=scale, dropout_rate=dropout_rate if use_dropout else 0.0,
               block_fn=block_fn)

  def body(q, k, v, mask, seed):
    batch_offset = jnp.asarray(jax.lax.axis_index(batch_axis) * q.shape[0] if batch_axis else 0, jnp.int32)
    q, k, v, mask = (_to_zigzag(t, ctx.axis, n) for t in (q, k, v, mask))
    out = _ring_local(ring, q, k, v, mask, seed, batch_offset)
    return _from_zigzag(out, ctx.axis, n)

  spec4, spec2 = P(batch_axis, ctx.axis, None, None), P(batch_axis, ctx.axis)
  out = sequence.shard_map(body, ctx, in_specs=(spec4, spec4, spec4, spec2, P()), out_specs=spec4)(
      q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask, seed)
  return out[:, :length]


__all__ = ["block_attention", "flash_block_fn", "merge", "ring_attention"]
