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

Global positions (`q_offset`, `k_offset`) drive the causal mask, the ALiBi bias `-slope_h * |q_pos - k_pos|` and the
attention-dropout counter hash (`kernels.common.dropout_keep`, keyed by (seed, global batch * heads + head, query,
key)), so masks, biases and dropout equal the unsharded call's. The block function is the flash block primitive
(`kernels.softmax.xla.flash_block`: chunked online softmax, its own custom_vjp taking cotangents of out and lse);
`block_attention` is the dense form of the same signature (plus the global batch offset of the dropout counters),
used with dropout when the batch is split over "data", and for `implementation="reference"`.

Every option of `kernels.softmax.softmax_attention` goes through. `implementation="pallas"` runs each block pair on
the flex Pallas kernels of the lowering platform (`pallas_block_fn`: no mask, or the causal one for a chunk against
itself, returning their log-sum-exp; the backward kernels take `delta - dlse`), never falling back; `"interpret"` runs them in interpret mode (CPU tests). The kernels take no offsets, which the zig-zag
layout makes unnecessary (every pair but a chunk against itself lies wholly below the diagonal), but their dropout
counters are a block's own positions and they add no ALiBi bias: those calls are refused (`refusal`, one line naming
the option and `mesh.sequence`) rather than run differently from one device. Keys and values with fewer heads than
the queries (grouped-query attention) are repeated to the query heads before the ring.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kernels import platform, sequence
from kernels.common import MASK_VALUE, dropout_keep, dropout_seed
from kernels.softmax import IMPLEMENTATIONS
from kernels.softmax.xla import flash_block


KERNEL_IMPLEMENTATIONS = ("pallas", "interpret")


def refusal(implementation: str | None, *, dropout: bool = False, alibi: bool = False) -> str | None:
  """Why the ring cannot run a softmax call with these options (None: it can). One line, naming the option and
  `mesh.sequence`. The ring runs the Pallas kernels for an explicit `implementation="pallas"` / `"interpret"`, but
  they add no ALiBi bias (on one device either) and their dropout counters are a block's own positions."""
  if implementation not in KERNEL_IMPLEMENTATIONS:
    return None
  if alibi:
    return (f"softmax implementation={implementation!r} with pos_encoding='alibi' and mesh.sequence > 1: the Pallas "
            f"kernels add no positional bias; use implementation=None or 'xla'")
  if dropout:
    return (f"softmax implementation={implementation!r} with attention dropout and mesh.sequence > 1: the Pallas "
            f"kernels key their dropout counters by a ring block's own positions, not the global ones; use "
            f"implementation=None or 'xla', attention_dropout_rate=0, or mesh.sequence=1")
  return None


def flash_block_fn(q, k, v, *, batch_offset, **kwargs):
  """`kernels.softmax.xla.flash_block` as the ring's block function (its dropout counters use the local batch index,
  so the ring calls it only where the batch is not split over devices or dropout is off)."""
  del batch_offset
  return flash_block(q, k, v, **kwargs)


def masked_softmax(s_BxHxLxS: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Softmax of float32 scores over the `allowed` keys of each row, and its log-sum-exp `[B, H, L]`: a ring's block
  pair (softmax's and flex's). A row with no allowed key gets weights 0 and `lse = MASK_VALUE`, so it weighs nothing
  when the ring merges blocks."""
  s_BxHxLxS = jnp.where(allowed, s_BxHxLxS, MASK_VALUE)
  m = jax.lax.stop_gradient(jnp.max(s_BxHxLxS, axis=-1, keepdims=True))
  p = jnp.where(allowed, jnp.exp(s_BxHxLxS - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  lse_BxHxL = jnp.where(denom[..., 0] > 0, m[..., 0] + jnp.log(jnp.maximum(denom[..., 0], 1e-30)), MASK_VALUE)
  return p / jnp.maximum(denom, 1e-30), lse_BxHxL


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
  w, lse_BxHxL = masked_softmax(s_BxHxLxS, allowed)
  if dropout_rate > 0.0 and seed is not None:
    bh = (batch_offset + jnp.arange(b, dtype=jnp.int32))[:, None] * h + jnp.arange(h, dtype=jnp.int32)[None, :]
    keep = dropout_keep(seed, bh[:, :, None, None], q_pos[None, None, :, None], k_pos[None, None, None, :],
                        dropout_rate)
    w = jnp.where(keep, w / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhls,bshd->blhd", w, v_BxSxHxD.astype(jnp.float32))
  return out, lse_BxHxL


# ---- the Pallas block: flex's kernels with no mask or the causal one, returning their log-sum-exp ---------------------


def block_plans(q_shape, dtype) -> dict:
  """flex's kernel plans (`kernels.softmax.pallas.KernelPlan`: tiles, the cached host block mask, per backend why its
  kernels cannot serve) for block pairs of `q_shape` `[B, C, H, D]`, keyed by `causal` (full pairs: False; a chunk
  against itself: True). Planned once per ring call (`ring_attention`), so the block function checks nothing again."""
  from kernels.softmax.pallas import plan  # noqa: PLC0415
  return {causal: plan(q_shape, q_shape, dtype, causal=causal, alibi_slopes=None) for causal in (False, True)}


def block_reason(plans: dict, backend: str) -> str | None:
  """Why `backend`'s kernels cannot take the ring's block pairs (`block_plans`), or None."""
  return plans[False].reason(backend) or plans[True].reason(backend)


def pallas_block_fn(backend: str, interpret: bool = False, plans: dict | None = None):
  """The ring's block function on `backend`'s flex Pallas kernels ("tpu" with `interpret=True`: how CPU tests run
  them): `(out float32, lse)` of one block pair through `flex_attention_kernel(..., return_lse=True)` (lse
  MASK_VALUE for a row without keys, as `flash_block`), `causal` only for a chunk against itself (`_pairs`).
  `plans`: the ring's (`block_plans`, whose reasons the ring read before choosing this function: nothing is checked
  again, here or in flex's driver); None: a direct caller's, planned and checked from the first block's shape. The
  kernels take neither offsets nor an ALiBi bias, and their dropout counters are block-local: `refusal` turns such
  calls away before the ring is built."""
  from kernels.flex.pallas import flex_attention_kernel  # noqa: PLC0415

  def block(q_BxCxHxD, k_BxCxHxD, v_BxCxHxD, *, key_mask, causal, scale, dropout_rate=0.0, seed=None, q_offset=0,
            k_offset=0, batch_offset=0, alibi_slopes=None):
    del seed, q_offset, k_offset, batch_offset  # positions only matter within a masked (diagonal) pair
    if dropout_rate > 0.0 or alibi_slopes is not None:
      raise ValueError("ring_attention: the Pallas block takes no dropout or ALiBi (see refusal)")
    if plans is None:  # a direct caller: plan and check here, once
      kernel = block_plans(q_BxCxHxD.shape, q_BxCxHxD.dtype)[bool(causal)]
      if (reason := kernel.reason(backend)) is not None and not interpret:
        raise ValueError(f"ring_attention: the {backend} kernels cannot take this block pair: {reason}")
    else:
      kernel = plans[bool(causal)]
    o, lse = flex_attention_kernel(q_BxCxHxD, k_BxCxHxD, v_BxCxHxD, kernel.block_mask, mask_mod=kernel.mask_mod,
                                   bitmaps=False, key_mask=key_mask, scale=scale, backend=backend,
                                   interpret=interpret, return_lse=True)
    return o.astype(jnp.float32), lse

  return block


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


def to_zigzag(x: jax.Array, axis: str, n: int) -> jax.Array:
  """Inside shard_map: local contiguous chunks (2i, 2i+1) of `x [B, 2c, ...]` -> zig-zag chunks (i, 2n-1-i)."""
  c = x.shape[1] // 2
  a, b = x[:, :c], x[:, c:]
  ra = jax.lax.ppermute(a, axis, [(s, _owner(2 * s, n)) for s in range(n)])
  rb = jax.lax.ppermute(b, axis, [(s, _owner(2 * s + 1, n)) for s in range(n)])
  # Device i receives chunk i through `ra` when i is even (an even chunk), else through `rb`.
  even = jax.lax.axis_index(axis) % 2 == 0
  return jnp.concatenate([jnp.where(even, ra, rb), jnp.where(even, rb, ra)], axis=1)


def from_zigzag(x: jax.Array, axis: str, n: int) -> jax.Array:
  """The inverse of `to_zigzag`."""
  c = x.shape[1] // 2
  first, second = x[:, :c], x[:, c:]
  even = jax.lax.axis_index(axis) % 2 == 0
  ra, rb = jnp.where(even, first, second), jnp.where(even, second, first)
  a = jax.lax.ppermute(ra, axis, [(_owner(2 * s, n), s) for s in range(n)])
  b = jax.lax.ppermute(rb, axis, [(_owner(2 * s + 1, n), s) for s in range(n)])
  return jnp.concatenate([a, b], axis=1)


# ---- the ring --------------------------------------------------------------------------------------------------------

def _pairs(causal: bool, hop: int):
  """Static chunk pairs `(query half, key half, masked)` a hop computes; for causal hops > 0 two alternatives chosen
  by whether the key block comes from an earlier device. Causal: only a chunk against itself (hop 0, same half) is
  masked; every other pair computed lies wholly below the diagonal, so its blocks run unmasked (statically known:
  what lets the Pallas kernels, which take no offsets, serve the ring)."""
  if not causal:
    return [(0, 0, False), (0, 1, False), (1, 0, False), (1, 1, False)], None
  if hop == 0:
    return [(0, 0, True), (1, 0, False), (1, 1, True)], None  # (0, 1): chunk 2n-1-i is after chunk i
  # Earlier source: against its first chunk; later: second queries only.
  return [(0, 0, False), (1, 0, False)], [(1, 0, False), (1, 1, False)]


class _Ring:
  """The per-device ring body (inside shard_map): static settings bound once."""

  def __init__(self, *, axis: str, n: int, causal: bool, scale: float, dropout_rate: float, alibi: bool, block_fn):
    self.axis, self.n, self.causal, self.scale, self.dropout_rate = axis, n, causal, scale, dropout_rate
    self.alibi, self.block_fn = alibi, block_fn

  def chunk_index(self, device, half):
    return jnp.where(half == 0, device, 2 * self.n - 1 - device)

  def block(self, q, k, v, mask, seed, batch_offset, slopes, me, src, qh, kh, masked):
    c = q.shape[1] // 2
    return self.block_fn(q[:, qh * c:(qh + 1) * c], k[:, kh * c:(kh + 1) * c], v[:, kh * c:(kh + 1) * c],
                         key_mask=mask[:, kh * c:(kh + 1) * c], causal=masked, scale=self.scale,
                         dropout_rate=self.dropout_rate, seed=seed,
                         q_offset=self.chunk_index(me, qh) * c, k_offset=self.chunk_index(src, kh) * c,
                         batch_offset=batch_offset, alibi_slopes=slopes if self.alibi else None)

  def hop_output(self, pairs, q, k, v, mask, seed, batch_offset, slopes, me, src):
    """Merged `(out, lse)` over the 2c local query rows from `pairs` (rows no pair touches: 0, MASK_VALUE)."""
    b, two_c, h, d = q.shape
    c = two_c // 2
    halves = [(jnp.zeros((b, c, h, d), jnp.float32), jnp.full((b, h, c), MASK_VALUE, jnp.float32)) for _ in range(2)]
    for qh, kh, masked in pairs:
      halves[qh] = merge(halves[qh], self.block(q, k, v, mask, seed, batch_offset, slopes, me, src, qh, kh, masked))
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

  def forward(self, q, k, v, mask, seed, batch_offset, slopes):
    me = jax.lax.axis_index(self.axis)
    out = lambda pairs, k, v, mask, src: self.hop_output(  # noqa: E731
        pairs, q, k, v, mask, seed, batch_offset, slopes, me, src)
    acc = self._hop(0, me, out, k, v, mask, me)

    # Hops 1..n-1 in a scan: one hop's blocks at a time (an unrolled loop lets XLA keep every hop's scores alive).
    def step(carry, hop):
      acc, k, v, mask = carry
      k, v, mask = self.rotate(k, v, mask)
      src = (me - hop) % self.n
      return (merge(acc, self._hop(1, src, out, k, v, mask, src)), k, v, mask), None

    (acc, _, _, _), _ = jax.lax.scan(step, (acc, k, v, mask), jnp.arange(1, self.n))
    return acc

  def backward(self, q, k, v, mask, seed, batch_offset, slopes, out, lse, d_out):
    """Gradients of q, k, v for the cotangent `d_out` of the merged output (`out`, `lse`: the forward's)."""
    me = jax.lax.axis_index(self.axis)
    c = q.shape[1] // 2
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    d_out = d_out.astype(jnp.float32)

    def hop_grads(pairs, k, v, mask, src, dq, dk, dv):
      for qh, kh, masked in pairs:
        qs, ks = slice(qh * c, (qh + 1) * c), slice(kh * c, (kh + 1) * c)
        f = lambda q_, k_, v_, masked=masked: self.block_fn(  # noqa: E731
            q_, k_, v_, key_mask=mask[:, ks], causal=masked, scale=self.scale, dropout_rate=self.dropout_rate,
            seed=seed, q_offset=self.chunk_index(me, qh) * c, k_offset=self.chunk_index(src, kh) * c,
            batch_offset=batch_offset, alibi_slopes=slopes if self.alibi else None)
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
def _ring_local(ring: _Ring, q, k, v, mask, seed, batch_offset, slopes):
  return ring.forward(q, k, v, mask, seed, batch_offset, slopes)[0].astype(q.dtype)


def _ring_local_fwd(ring, q, k, v, mask, seed, batch_offset, slopes):
  out, lse = ring.forward(q, k, v, mask, seed, batch_offset, slopes)
  return out.astype(q.dtype), (q, k, v, mask, seed, batch_offset, slopes, out, lse)


def _ring_local_bwd(ring, res, d_out):
  q, k, v, mask, seed, batch_offset, slopes, out, lse = res
  dq, dk, dv = ring.backward(q, k, v, mask, seed, batch_offset, slopes, out, lse, d_out)
  zero = lambda x: np.zeros(np.shape(x), jax.dtypes.float0)  # noqa: E731  (integer / bool inputs)
  # ALiBi slopes are constants of the method (as in the unsharded core, they take no gradient).
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero(mask), zero(seed), zero(batch_offset),
          jnp.zeros_like(slopes))


_ring_local.defvjp(_ring_local_fwd, _ring_local_bwd)


def ring_attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, *,
                   key_mask_BxL: jax.Array | None = None, causal: bool = False, scale: float | None = None,
                   dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                   alibi_slopes: jax.Array | None = None, implementation: str | None = None,
                   ctx: sequence.SequenceMesh | None = None, block_fn=None) -> jax.Array:
  """Exact softmax attention of length-sharded q, k, v over `ctx` (default: `sequence.active()`), `[B, L, H, D]`.

  A length that 2 * mesh.sequence does not divide is padded with masked keys (dropped from the output). Dropout (when
  `dropout_rng` is given and `dropout_rate > 0`) is the counter hash keyed by global positions, as in
  `kernels.softmax.softmax_attention`; `alibi_slopes` (float `[heads]`) add `-slope_h * |q_pos - k_pos|` at global
  positions. `implementation`: None / "xla" run the flash block primitive, "reference" the dense `block_attention`,
  "pallas" the Pallas flash kernels of the platform the program is lowered for (never falling back), "interpret"
  those (TPU) kernels in interpret mode; a kernel call with dropout or ALiBi is refused (`refusal`). `block_fn`
  (default from `implementation`): the flash block primitive, or the dense `block_attention` when dropout is on and
  the batch is split over "data" (flash_block's counters take the local batch index). k and v may have fewer heads
  than q (a divisor: grouped-query attention).
  """
  ctx = ctx or sequence.active()
  if ctx is None:
    raise ValueError("ring_attention needs a sequence mesh (kernels.sequence.use_mesh) with mesh.sequence > 1")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown ring_attention implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  use_dropout = dropout_rate > 0.0 and dropout_rng is not None
  if (reason := refusal(implementation, dropout=use_dropout, alibi=alibi_slopes is not None)) is not None:
    raise ValueError(reason.replace("mesh.sequence > 1", f"mesh.sequence={ctx.size}", 1))
  b, length, h, d = q_BxLxHxD.shape
  kv_heads = k_BxLxHxD.shape[2]
  if kv_heads != h:  # grouped-query attention: each key/value head serves h // kv_heads query heads
    if h % kv_heads or v_BxLxHxD.shape[2] != kv_heads:
      raise ValueError(f"ring_attention: key/value heads {kv_heads} must divide the query heads {h}")
    k_BxLxHxD, v_BxLxHxD = (jnp.repeat(t, h // kv_heads, axis=2) for t in (k_BxLxHxD, v_BxLxHxD))
  if alibi_slopes is not None and tuple(jnp.shape(alibi_slopes)) != (h,):
    raise ValueError(f"ring_attention: alibi_slopes must have shape [heads] = ({h},), got {jnp.shape(alibi_slopes)}")
  n = ctx.size
  scale = d ** -0.5 if scale is None else scale
  mask = jnp.ones((b, length), bool) if key_mask_BxL is None else key_mask_BxL.astype(bool)
  pad = -length % (2 * n)
  if pad:
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                       for t in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  seed = dropout_seed(dropout_rng) if use_dropout else jnp.zeros((), jnp.int32)
  batch_axis = ctx.batch_axis(b)
  detail = "the flash block primitive per block pair (kernels/softmax/sequence_parallel.py)"
  kernel_blocks = None
  if block_fn is None and implementation in KERNEL_IMPLEMENTATIONS:
    plans = block_plans((b, (length + pad) // (2 * n), h, d), q_BxLxHxD.dtype)
    kernel_blocks = {backend: block_reason(plans, backend) or pallas_block_fn(backend, plans=plans)
                     for backend in ("tpu", "gpu")}
    if implementation == "interpret":
      block_fn, kernel_blocks = pallas_block_fn("tpu", interpret=True, plans=plans), None
    detail = f"the Pallas flash kernels (flex's) per block pair (implementation={implementation!r})"
  elif block_fn is None:
    block_fn = flash_block_fn
    if implementation == "reference":
      block_fn, detail = block_attention, "dense per-block scores (implementation='reference')"
    elif use_dropout and batch_axis is not None:
      block_fn = block_attention
      detail = ("dense per-block scores: dropout counters need the global batch index, which flash_block does not "
                "take")
  sequence.ran("ring_attention", "ring", detail)
  slopes = jnp.zeros((h,), jnp.float32) if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
  spec4, spec2 = P(batch_axis, ctx.axis, None, None), P(batch_axis, ctx.axis)

  def run(block_fn):
    ring = _Ring(axis=ctx.axis, n=n, causal=causal, scale=scale, dropout_rate=dropout_rate if use_dropout else 0.0,
                 alibi=alibi_slopes is not None, block_fn=block_fn)

    def body(q, k, v, mask, seed, slopes):
      batch_offset = jnp.asarray(jax.lax.axis_index(batch_axis) * q.shape[0] if batch_axis else 0, jnp.int32)
      q, k, v, mask = (to_zigzag(t, ctx.axis, n) for t in (q, k, v, mask))
      out = _ring_local(ring, q, k, v, mask, seed, batch_offset, slopes)
      return from_zigzag(out, ctx.axis, n)

    return sequence.shard_map(body, ctx, in_specs=(spec4, spec4, spec4, spec2, P(), P()), out_specs=spec4)(
        q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask, seed, jax.lax.stop_gradient(slopes))

  if kernel_blocks is not None:  # "pallas": the lowering platform's kernels, never a fallback
    out = platform.require_kernel("ring_attention", kernels={
        backend: fn if isinstance(fn, str) else functools.partial(run, fn) for backend, fn in kernel_blocks.items()})
  else:
    out = run(block_fn)
  return out[:, :length]


__all__ = ["block_attention", "block_plans", "block_reason", "flash_block_fn", "from_zigzag", "KERNEL_IMPLEMENTATIONS",
           "masked_softmax", "merge", "pallas_block_fn", "refusal", "ring_attention", "to_zigzag"]
