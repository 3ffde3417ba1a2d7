"""Banded block-sparse attention with the length sharded over the "sequence" mesh axis: halo exchange.

A layout whose allowed pairs depend only on the block distance `i - j` (local windows, Longformer's sliding and dilated
windows without global blocks) is a band reaching `before` blocks back and `after` blocks ahead. Each device then needs
only its neighbours' `before` last and `after` first key/value blocks: two `jax.lax.ppermute`s bring them, and
`kernels.block_sparse_attention` runs on the extended local sequence `[halo before | own blocks | halo after]` with
the band cut to that length (halo keys beyond the sequence ends are masked; the halo rows' outputs are dropped).
Communication per call: `(before + after) * block_size` tokens of K and V per device, independent of the length.

Global blocks (Longformer's, leading rows and columns all allowed) are gathered once: their K/V blocks are broadcast
from device 0 and put in front of every extended sequence (the halo keys that are global are masked so each key counts
once), and the global query rows, which see every key, are per-shard partial softmaxes (`flash_block`) all-gathered
and merged. `halo_refusal` says, before any work, why a call has no halo form; the layer then takes the exact
fallback (K/V all-gathered) with that reason recorded (`kernels.sequence.ran`):
  * layouts that are not a band between their non-global blocks (strided columns, random blocks: Sparse Transformer,
    BigBird), or a band wider than a shard;
  * attention dropout: the block-sparse dropout hash is keyed by positions in the sequence the kernel sees (here the
    extended local sequence), so the halo could not reproduce the unsharded mask;
  * global blocks with an explicit Pallas `implementation`: the global rows' partial softmaxes need the log-sum-exp,
    which the halo takes from `flash_block` (XLA) only (flex's driver returns it, `return_lse=True`, as the ring uses,
    but the halo does not call it yet); the fallback runs the kernels asked for, which never fall back to XLA.
Every other option reaches the per-shard call unchanged: `implementation` (the band's kernel work runs it), `causal`,
key padding, per-head layouts (Longformer's dilated heads), `block_size`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kernels import sequence
from kernels.softmax.sequence_parallel import block_attention, merge
from kernels.softmax.xla import flash_block


def _band(layout_HxNxN: np.ndarray) -> np.ndarray | None:
  """`band[h, d + N - 1]`: whether pairs at block distance `d = i - j` are allowed, or None when the layout is not
  translation invariant (not a band)."""
  layout = np.asarray(layout_HxNxN, bool)
  n = layout.shape[-1]
  distance = np.arange(n)[:, None] - np.arange(n)[None, :]
  band = np.zeros((layout.shape[0], 2 * n - 1), bool)
  for h in range(layout.shape[0]):
    band[h, (distance + n - 1)[layout[h]]] = True
  return band if np.array_equal(band[:, distance + n - 1], layout) else None


def global_blocks(layout_HxNxN: np.ndarray) -> int:
  """The number G of leading global blocks: rows and columns 0..G-1 all allowed (Longformer's, BigBird's)."""
  layout = np.asarray(layout_HxNxN, bool)
  g = 0
  while g < layout.shape[-1] - 1 and layout[:, g, :].all() and layout[:, :, g].all():
    g += 1
  return g


def band_reach(layout_HxNxN: np.ndarray) -> tuple[int, int] | None:
  """`(before, after)` block reach of a translation-invariant band layout, or None when the layout is not one."""
  band = _band(layout_HxNxN)
  if band is None or not band.any():
    return None
  allowed = np.nonzero(band.any(axis=0))[0] - (band.shape[1] // 2)
  return int(max(allowed.max(), 0)), int(max(-allowed.min(), 0))


def halo_refusal(layout_HxNxN: np.ndarray, *, length: int, block_size: int, causal: bool, size: int,
                 implementation: str | None = None, dropout: bool = False) -> str | None:
  """Why a call of these options has no halo form over `size` sequence shards (None: it has one). `length` is the
  caller's padded length (a multiple of `block_size`)."""
  if length % block_size:
    return f"length {length} is not a multiple of block_size={block_size}"
  g = global_blocks(layout_HxNxN)
  reach = band_reach(np.asarray(layout_HxNxN, bool)[:, g:, g:])
  if reach is None:
    return "the layout is not a band between its global blocks (strided or random blocks)"
  local_blocks = -(-length // (size * block_size))
  if max(*reach, g) > local_blocks:
    return (f"the band (reach {reach} blocks) or the global blocks ({g}) are wider than a shard of {local_blocks} "
            f"blocks")
  if g and causal:
    return "global blocks with causal=True"
  if dropout:
    return ("attention dropout (the block-sparse dropout hash is keyed by positions in the sequence the kernel sees, "
            "which the halo's extended local sequence would shift)")
  if g and implementation in ("pallas", "interpret"):
    return (f"global blocks with implementation={implementation!r}: the global rows' partial softmaxes need the "
            f"log-sum-exp the Pallas kernels do not return")
  return None


def halo_block_sparse_attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                                layout_HxNxN: np.ndarray, *, block_size: int, causal: bool,
                                key_mask_BxL: jax.Array | None, implementation: str | None = None,
                                scale: float | None = None,
                                ctx: sequence.SequenceMesh | None = None) -> jax.Array | None:
  """`kernels.block_sparse_attention` of length-sharded inputs by halo exchange, or None when this call has no halo
  form (`halo_refusal`, recorded as the exact fallback's reason by the caller). A length that mesh.sequence *
  block_size does not divide is padded with masked key blocks (the band is the same at any length)."""
  from kernels.block_sparse import block_sparse_attention  # pylint: disable=g-import-not-at-top  (package entry)

  ctx = ctx or sequence.active()
  b, length = q_BxLxHxD.shape[:2]
  n = ctx.size
  if halo_refusal(layout_HxNxN, length=length, block_size=block_size, causal=causal, size=n,
                  implementation=implementation) is not None:
    return None
  scale = q_BxLxHxD.shape[-1] ** -0.5 if scale is None else float(scale)
  g = global_blocks(layout_HxNxN)
  rest = np.asarray(layout_HxNxN, bool)[:, g:, g:]  # the pattern between non-global blocks
  band, reach = _band(rest), band_reach(rest)
  if reach is None:
    return None
  n0 = rest.shape[-1]  # the band is defined for block distances below n0
  mask = jnp.ones((b, length), bool) if key_mask_BxL is None else key_mask_BxL.astype(bool)
  pad = -length % (n * block_size)  # whole blocks per shard: padded with masked keys (a band does not change)
  if pad:
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                       for t in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  before, after = reach
  local_blocks = (length + pad) // block_size // n
  ext = before + local_blocks + after
  d = np.arange(ext)[:, None] - np.arange(ext)[None, :]
  layout_ext = np.where(np.abs(d) < n0, band[:, np.clip(d + n0 - 1, 0, 2 * n0 - 2)], False)
  # Global key blocks in front of the extended sequence, seen by every row.
  layout_ext = np.concatenate([np.ones((layout_ext.shape[0], ext, g), bool), layout_ext], axis=2)
  layout_ext = np.concatenate([np.ones((layout_ext.shape[0], g, g + ext), bool), layout_ext], axis=1)
  hb, ha, gb = before * block_size, after * block_size, g * block_size
  local = local_blocks * block_size
  axis = ctx.axis

  def body(q, k, v, m):
    me = jax.lax.axis_index(axis)
    right = [(s, (s + 1) % n) for s in range(n)]  # my last blocks go to the next device
    left = [(s, (s - 1) % n) for s in range(n)]
    parts_k, parts_v, parts_m, parts_q = [], [], [], []
    first = me * local  # global position of my first token
    if gb:  # the global blocks live on device 0: broadcast once (a psum of device 0's copy)
      on0 = lambda t: jax.lax.psum(jnp.where(me == 0, t[:, :gb], jnp.zeros_like(t[:, :gb])), axis)  # noqa: E731
      kg, vg, mg = on0(k), on0(v), jax.lax.psum((m[:, :gb] & (me == 0)).astype(jnp.int32), axis) > 0
      parts_k.append(kg), parts_v.append(vg), parts_m.append(mg), parts_q.append(jnp.zeros_like(q[:, :gb]))
    not_global = lambda start, size: start + jnp.arange(size) >= gb  # noqa: E731  (counted once, in front)
    if hb:
      kp, vp, mp = (jax.lax.ppermute(t[:, -hb:], axis, right) for t in (k, v, m))
      parts_k.append(kp), parts_v.append(vp), parts_q.append(jnp.zeros_like(q[:, :hb]))
      parts_m.append(mp & (me > 0) & not_global(first - hb, hb))
    parts_k.append(k), parts_v.append(v), parts_m.append(m & not_global(first, local)), parts_q.append(q)
    if ha:
      kn, vn, mn = (jax.lax.ppermute(t[:, :ha], axis, left) for t in (k, v, m))
      parts_k.append(kn), parts_v.append(vn), parts_q.append(jnp.zeros_like(q[:, :ha]))
      parts_m.append(mn & (me < n - 1) & not_global(first + local, ha))
    cat = lambda xs: jnp.concatenate(xs, axis=1)  # noqa: E731
    y = block_sparse_attention(cat(parts_q), cat(parts_k), cat(parts_v), layout_ext, block_size=block_size,
                               causal=causal, scale=scale, implementation=implementation, key_mask=cat(parts_m))
    y = y[:, gb + hb:gb + hb + local]
    if gb:  # global query rows see every key: per-shard partial softmaxes, all-gathered and merged
      qg = jax.lax.psum(jnp.where(me == 0, q[:, :gb], jnp.zeros_like(q[:, :gb])), axis)
      partial = block_attention if implementation == "reference" else flash_block  # the dense form for "reference"
      o_p, lse_p = partial(qg, k, v, key_mask=m, causal=False, scale=scale)
      os_, lses = jax.lax.all_gather(o_p, axis), jax.lax.all_gather(lse_p, axis)
      acc = (os_[0], lses[0])
      for j in range(1, n):
        acc = merge(acc, (os_[j], lses[j]))
      y = y.at[:, :gb].set(jnp.where(me == 0, acc[0].astype(y.dtype), y[:, :gb]))
    return y

  spec4, spec2 = P(ctx.batch_axis(b), axis, None, None), P(ctx.batch_axis(b), axis)
  sequence.ran("block_sparse_attention", "halo",
               f"{before} + {after} neighbouring key blocks exchanged" + (f", {g} global blocks gathered" if g else "")
               + " (kernels/block_sparse/sequence_parallel.py)")
  out = sequence.shard_map(body, ctx, in_specs=(spec4, spec4, spec4, spec2), out_specs=spec4)(
      q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask)
  return out[:, :length]


__all__ = ["band_reach", "global_blocks", "halo_block_sparse_attention", "halo_refusal"]
