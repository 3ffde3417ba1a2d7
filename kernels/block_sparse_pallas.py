"""Pallas kernels for block-sparse softmax attention (FlashAttention-2 style, only the allowed key blocks are visited).

The layout (`[heads or 1, N, N]`, see `kernels.block_sparse`) is refined on the host to kernel tiles of
`block_q x block_kv` tokens (each tile lies inside one layout block) and turned into index tables, as splash
attention's `MaskInfo`:
  forward and dQ:  for each (layout head, query tile) the allowed key tiles in increasing order and their count;
  dK/dV:           the transposed lists: for each (layout head, key tile) the query tiles that see it.
Tiles wholly in the future of a causal row are dropped on the host; tiles crossing the diagonal are masked in the
kernel. Lists are padded to the longest row by repeating their last entry, so the padding steps of the grid map to the
block already resident and issue no copy; their compute is skipped by `pl.when(step < count)`.

Forward: online softmax over the listed key tiles, saving the log-sum-exp per query row. Backward (recomputation from
the log-sum-exp, `delta = rowsum(o * do)` precomputed in XLA): one kernel accumulates dQ over the query tile's key list,
another accumulates dK and dV over the key tile's query list. A row with no allowed key outputs 0 and gets zero
gradients (its scores are all masked; its log-sum-exp is stored as 0 and never used unmasked).

Backends:
  "tpu"  `pl.pallas_call` with `pltpu.PrefetchScalarGridSpec`: the tables are scalar-prefetched into SMEM and drive
         the BlockSpec index maps, so only allowed K/V tiles are DMA'd; grid `(batch, heads, row tiles, list steps)`,
         the last axis sequential, accumulators in VMEM scratch. `interpret=True` runs the same kernels on CPU;
  "gpu"  Mosaic GPU (`plgpu.kernel`, Hopper wgmma): one warpgroup per (query or key tile, head, batch) walks its
         list reading the tables from global memory and double-buffers the K/V (or Q/dO) tiles with TMA. Its
         matmul operands are arranged so the GPU interpreter (`InterpretGPUParams`) can run it on CPU: no transposed
         SMEM views (K, V, Q and dO are also passed transposed, `[B, H, D, L]`) and register values reach wgmma
         through SMEM.
Scores, softmax statistics and accumulators are float32; matmul operands keep the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Backend = Literal["tpu", "gpu"]
_LANES = 128  # TPU lane width: per-row statistics travel broadcast over one vreg row, as in jax's TPU attention kernels
_M_INIT = -1e30  # finite start of the running max: exp(-inf - _M_INIT) = 0 for masked scores, never NaN
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Kernel tile sizes in tokens; each must divide the layout's `block_size` (a tile lies inside one layout block).

  None picks the backend default: on TPU the largest power-of-two divisor of `block_size` up to 128 (the MXU
  width), on GPU 64 (the wgmma rows of one warpgroup; the layout block must then be a multiple of 64).
  """

  block_q: int | None = None
  block_kv: int | None = None

  def resolve(self, block_size: int, backend: Backend) -> tuple[int, int]:
    default = math.gcd(block_size, 128) if backend == "tpu" else 64
    bq = default if self.block_q is None else self.block_q
    bkv = default if self.block_kv is None else self.block_kv
    for name, value in (("block_q", bq), ("block_kv", bkv)):
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value}")
      if block_size % value:
        raise ValueError(f"{name}={value} must divide the layout {block_size=} (a tile lies in one layout block)")
    return int(bq), int(bkv)


# ----------------------------------------------------------------------------------------------------------------------
# Host-side tables.


@dataclasses.dataclass(frozen=True)
class Tables:
  """Index tables of one (layout, tiling, causal) configuration, flattened for SMEM / 1-D loads.

  `kv_index[(h * nq + i) * kv_width + s]` is the s-th key tile of query tile i (layout head h), `kv_count[h * nq + i]`
  how many there are; `q_index` / `q_count` / `q_width` the same for the transposed (key tile -> query tiles) lists.
  """

  kv_index: np.ndarray
  kv_count: np.ndarray
  kv_width: int
  q_index: np.ndarray
  q_count: np.ndarray
  q_width: int
  num_q_tiles: int
  num_kv_tiles: int
  layout_heads: int


def _lists(allowed_HxRxC: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  counts = allowed_HxRxC.sum(-1).astype(np.int32)
  width = max(int(counts.max(initial=0)), 1)
  order = np.argsort(~allowed_HxRxC, axis=-1, kind="stable")[..., :width]  # allowed first, increasing
  # Pad each list with its last real entry (0 for an empty list): the pipeline keeps that block, no new copy.
  last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
  steps = np.arange(width)
  index = np.where(steps < counts[..., None], order, np.where(counts[..., None] > 0, last, 0))
  return index.astype(np.int32).reshape(-1), counts.reshape(-1), width


def tile_layout(layout_HxNxN: np.ndarray, block_size: int, block_q: int, block_kv: int, causal: bool) -> np.ndarray:
  """The layout refined to kernel tiles `[H, L // block_q, L // block_kv]`; causal drops tiles wholly in the future."""
  tiles = np.repeat(np.repeat(np.asarray(layout_HxNxN, bool), block_size // block_q, axis=1),
                    block_size // block_kv, axis=2)
  if causal:
    q_last = (np.arange(tiles.shape[1]) + 1) * block_q - 1
    kv_first = np.arange(tiles.shape[2]) * block_kv
    tiles = tiles & (kv_first[None, None, :] <= q_last[None, :, None])
  return tiles


@functools.lru_cache(maxsize=64)
def _tables_cached(layout_bytes: bytes, shape: tuple[int, ...], block_size: int, block_q: int, block_kv: int,
                   causal: bool) -> Tables:
  layout = np.frombuffer(layout_bytes, dtype=np.bool_).reshape(shape)
  tiles = tile_layout(layout, block_size, block_q, block_kv, causal)
  kv_index, kv_count, kv_width = _lists(tiles)
  q_index, q_count, q_width = _lists(np.swapaxes(tiles, 1, 2))
  return Tables(kv_index, kv_count, kv_width, q_index, q_count, q_width, tiles.shape[1], tiles.shape[2],
                tiles.shape[0])


def make_tables(layout_HxNxN: np.ndarray, block_size: int, block_q: int, block_kv: int, causal: bool) -> Tables:
  layout = np.ascontiguousarray(layout_HxNxN, dtype=np.bool_)
  return _tables_cached(layout.tobytes(), layout.shape, block_size, block_q, block_kv, causal)


# ----------------------------------------------------------------------------------------------------------------------
# TPU kernels.


def _lanes(x_Rx128: jax.Array, width: int) -> jax.Array:
  """A lane-broadcast statistic `[R, 128]` widened (or narrowed) to `[R, width]`."""
  if width <= _LANES:
    return x_Rx128[:, :width]
  return jnp.tile(x_Rx128, (1, width // _LANES))


def _tpu_mask(s_QxK: jax.Array, q_tile, kv_tile, kvm_ref, *, causal: bool, block_q: int, block_kv: int) -> jax.Array:
  if causal:
    q_pos = q_tile * block_q + lax.broadcasted_iota(jnp.int32, s_QxK.shape, 0)
    kv_pos = kv_tile * block_kv + lax.broadcasted_iota(jnp.int32, s_QxK.shape, 1)
    s_QxK = jnp.where(kv_pos <= q_pos, s_QxK, -jnp.inf)
  if kvm_ref is not None:
    s_QxK = jnp.where(kvm_ref[...] != 0, s_QxK, -jnp.inf)  # [1, block_kv] broadcast over the rows
  return s_QxK


def _tpu_fwd_kernel(kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, *rest, scale, causal, block_q, block_kv,
                    num_q_tiles, kv_width, head_stride, has_mask):
  kvm_ref, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = (rest[0], rest[1:]) if has_mask else (None, rest)
  h, i, step = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = h * head_stride * num_q_tiles + i

  @pl.when(step == 0)
  def _init():
    m_scr[...] = jnp.full_like(m_scr, _M_INIT)
    l_scr[...] = jnp.zeros_like(l_scr)
    acc_scr[...] = jnp.zeros_like(acc_scr)

  @pl.when(step < kv_count_ref[row])
  def _compute():
    kv_tile = kv_index_ref[row * kv_width + step]
    s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
    s = _tpu_mask(s, i, kv_tile, kvm_ref, causal=causal, block_q=block_q, block_kv=block_kv)
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
    p = jnp.exp(s - _lanes(m_next, block_kv))
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * _lanes(alpha, acc_scr.shape[-1]) + pv

  @pl.when(step == kv_width - 1)
  def _finish():
    l = l_scr[...]
    seen = l > 0.0  # False only for rows without a single unmasked key
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = (acc_scr[...] * _lanes(inv, acc_scr.shape[-1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def _tpu_dq_kernel(kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale, causal,
                   block_q, block_kv, num_q_tiles, kv_width, head_stride, has_mask):
  kvm_ref, (dq_ref, dq_scr) = (rest[0], rest[1:]) if has_mask else (None, rest)
  h, i, step = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = h * head_stride * num_q_tiles + i

  @pl.when(step == 0)
  def _init():
    dq_scr[...] = jnp.zeros_like(dq_scr)

  @pl.when(step < kv_count_ref[row])
  def _compute():
    kv_tile = kv_index_ref[row * kv_width + step]
    k = k_ref[...]
    s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * scale
    s = _tpu_mask(s, i, kv_tile, kvm_ref, causal=causal, block_q=block_q, block_kv=block_kv)
    p = jnp.exp(s - _lanes(lse_ref[...], block_kv))
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_ref[...], block_kv))
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(step == kv_width - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(q_index_ref, q_count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale, causal,
                    block_q, block_kv, num_kv_tiles, q_width, head_stride, has_mask):
  kvm_ref, (dk_ref, dv_ref, dk_scr, dv_scr) = (rest[0], rest[1:]) if has_mask else (None, rest)
  h, j, step = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  col = h * head_stride * num_kv_tiles + j

  @pl.when(step == 0)
  def _init():
    dk_scr[...] = jnp.zeros_like(dk_scr)
    dv_scr[...] = jnp.zeros_like(dv_scr)

  @pl.when(step < q_count_ref[col])
  def _compute():
    q_tile = q_index_ref[col * q_width + step]
    q, do = q_ref[...], do_ref[...]
    s = lax.dot_general(q, k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
    s = _tpu_mask(s, q_tile, j, kvm_ref, causal=causal, block_q=block_q, block_kv=block_kv)
    p = jnp.exp(s - _lanes(lse_ref[...], block_kv))  # [bq, bkv]
    dv_scr[...] += lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_ref[...], block_kv))
    dk_scr[...] += lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)

  @pl.when(step == q_width - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable, so it can ride through custom_vjp as a non-differentiable arg)."""

  tables: Tables = dataclasses.field(hash=False, compare=False)
  key: tuple  # what identifies `tables`
  block_q: int
  block_kv: int
  causal: bool
  scale: float
  backend: Backend
  interpret: object  # False, True, or a pltpu.InterpretParams / InterpretGPUParams


def _tpu_params(sem):
  return pltpu.CompilerParams(dimension_semantics=sem)


def _tpu_forward(st: _Static, q, k, v, kvm):
  """q, k, v: [B, H, L, D]; kvm: int32 [B * num_kv_tiles, 1, block_kv] or None -> o [B,H,L,D], lse [B,H,L,128]."""
  b, h, length, d = q.shape
  t = st.tables
  hs = 1 if t.layout_heads > 1 else 0
  bq, bkv, kw, nq = st.block_q, st.block_kv, t.kv_width, t.num_q_tiles

  def kv_map(bi, hi, i, s, idx, cnt):
    return bi, hi, idx[(hi * hs * nq + i) * kw + s], 0

  def kvm_map(bi, hi, i, s, idx, cnt):
    return bi * t.num_kv_tiles + idx[(hi * hs * nq + i) * kw + s], 0, 0

  q_map = lambda bi, hi, i, s, idx, cnt: (bi, hi, i, 0)  # noqa: E731
  in_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bkv, d), kv_map),
              pl.BlockSpec((None, None, bkv, v.shape[-1]), kv_map)]
  args = [q, k, v]
  if kvm is not None:
    in_specs.append(pl.BlockSpec((None, 1, bkv), kvm_map))
    args.append(kvm)
  kernel = functools.partial(_tpu_fwd_kernel, scale=st.scale, causal=st.causal, block_q=bq, block_kv=bkv,
                             num_q_tiles=nq, kv_width=kw, head_stride=hs, has_mask=kvm is not None)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, nq, kw), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bq, v.shape[-1]), q_map),
                     pl.BlockSpec((None, None, bq, _LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
                          pltpu.VMEM((bq, v.shape[-1]), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, h, length, v.shape[-1]), q.dtype),
                 jax.ShapeDtypeStruct((b, h, length, _LANES), jnp.float32)],
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=st.interpret, name="block_sparse_fwd",
  )(jnp.asarray(t.kv_index), jnp.asarray(t.kv_count), *args)
  return o, lse


def _tpu_backward(st: _Static, q, k, v, kvm, do, lse_lanes, delta_lanes):
  b, h, length, d = q.shape
  dv_dim = v.shape[-1]
  t = st.tables
  hs = 1 if t.layout_heads > 1 else 0
  bq, bkv, nq, nk = st.block_q, st.block_kv, t.num_q_tiles, t.num_kv_tiles
  common = dict(scale=st.scale, causal=st.causal, block_q=bq, block_kv=bkv, head_stride=hs, has_mask=kvm is not None)

  # dQ: the forward's lists.
  kw = t.kv_width
  own = lambda bi, hi, i, s, idx, cnt: (bi, hi, i, 0)  # noqa: E731

  def listed_kv(bi, hi, i, s, idx, cnt):
    return bi, hi, idx[(hi * hs * nq + i) * kw + s], 0

  def listed_kvm(bi, hi, i, s, idx, cnt):
    return bi * nk + idx[(hi * hs * nq + i) * kw + s], 0, 0

  in_specs = [pl.BlockSpec((None, None, bq, d), own), pl.BlockSpec((None, None, bkv, d), listed_kv),
              pl.BlockSpec((None, None, bkv, dv_dim), listed_kv), pl.BlockSpec((None, None, bq, dv_dim), own),
              pl.BlockSpec((None, None, bq, _LANES), own), pl.BlockSpec((None, None, bq, _LANES), own)]
  args = [q, k, v, do, lse_lanes, delta_lanes]
  if kvm is not None:
    in_specs.append(pl.BlockSpec((None, 1, bkv), listed_kvm))
    args.append(kvm)
  dq = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, num_q_tiles=nq, kv_width=kw, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, nq, kw), in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, bq, d), own),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=st.interpret, name="block_sparse_bwd_dq",
  )(jnp.asarray(t.kv_index), jnp.asarray(t.kv_count), *args)

  # dK, dV: the transposed lists.
  qw = t.q_width

  def listed_q(bi, hi, j, s, idx, cnt):
    return bi, hi, idx[(hi * hs * nk + j) * qw + s], 0

  own_kvm = lambda bi, hi, j, s, idx, cnt: (bi * nk + j, 0, 0)  # noqa: E731
  in_specs = [pl.BlockSpec((None, None, bq, d), listed_q), pl.BlockSpec((None, None, bkv, d), own),
              pl.BlockSpec((None, None, bkv, dv_dim), own), pl.BlockSpec((None, None, bq, dv_dim), listed_q),
              pl.BlockSpec((None, None, bq, _LANES), listed_q), pl.BlockSpec((None, None, bq, _LANES), listed_q)]
  args = [q, k, v, do, lse_lanes, delta_lanes]
  if kvm is not None:
    in_specs.append(pl.BlockSpec((None, 1, bkv), own_kvm))
    args.append(kvm)
  dk, dv = pl.pallas_call(
      functools.partial(_tpu_dkv_kernel, num_kv_tiles=nk, q_width=qw, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, nk, qw), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bkv, d), own), pl.BlockSpec((None, None, bkv, dv_dim), own)],
          scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32), pltpu.VMEM((bkv, dv_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=st.interpret, name="block_sparse_bwd_dkv",
  )(jnp.asarray(t.q_index), jnp.asarray(t.q_count), *args)
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------------
# custom_vjp glue (layout [B, H, L, D] inside).


def _kv_mask_tiles(kv_mask_BxL, block_kv: int):
  """int32 `[B * num_kv_tiles, 1, block_kv]`: one key tile per leading index, so its block spans the two minor
  dimensions whole (legal on TPU for any block_kv)."""
  b, length = kv_mask_BxL.shape
  return kv_mask_BxL.astype(jnp.int32).reshape(b * (length // block_kv), 1, block_kv)


def _forward(st: _Static, q, k, v, kv_mask):
  if st.backend == "gpu":
    from kernels import block_sparse_pallas_gpu as gpu  # noqa: PLC0415  (GPU-only imports stay off the TPU path)
    return gpu.forward(st, q, k, v, kv_mask)
  kvm = None if kv_mask is None else _kv_mask_tiles(kv_mask, st.block_kv)
  o, lse_lanes = _tpu_forward(st, q, k, v, kvm)
  return o, lse_lanes[..., 0]


def _backward(st: _Static, q, k, v, kv_mask, o, lse, do):
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, L]
  if st.backend == "gpu":
    from kernels import block_sparse_pallas_gpu as gpu  # noqa: PLC0415
    return gpu.backward(st, q, k, v, kv_mask, do, lse, delta)
  kvm = None if kv_mask is None else _kv_mask_tiles(kv_mask, st.block_kv)
  lanes = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, _LANES))  # noqa: E731
  return _tpu_backward(st, q, k, v, kvm, do, lanes(lse), lanes(delta))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, kv_mask):
  return _forward(st, q, k, v, kv_mask)[0]


def _attention_fwd(st, q, k, v, kv_mask):
  o, lse = _forward(st, q, k, v, kv_mask)
  return o, (q, k, v, kv_mask, o, lse)


def _attention_bwd(st, res, do):
  q, k, v, kv_mask, o, lse = res
  dq, dk, dv = _backward(st, q, k, v, kv_mask, o, lse, do)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def accelerator_backend() -> Backend | None:
  """The kernel backend of the default JAX backend: "tpu", "gpu" (Mosaic GPU), or None (no kernel: CPU)."""
  platform = jax.default_backend()
  return "tpu" if platform == "tpu" else "gpu" if platform in ("gpu", "cuda") else None


def check_supported(q_shape, dtype, block_size: int, block_sizes: BlockSizes | None,
                    backend: Backend) -> tuple[int, int]:
  """Resolved `(block_q, block_kv)`; raises ValueError naming the value and the constraint the backend imposes."""
  block_q, block_kv = (block_sizes or BlockSizes()).resolve(block_size, backend)
  head_dim = q_shape[-1]
  if backend == "tpu":
    if block_q % 8:
      raise ValueError(f"{block_q=} must be a multiple of 8 on TPU (sublane tiling of the [block_q, head_dim] "
                       f"blocks) and divide the layout {block_size=}")
    for name, value in (("block_kv", block_kv), ("head_dim", head_dim)):
      if value > _LANES and value % _LANES:
        raise ValueError(f"{name}={value} must be at most {_LANES} or a multiple of {_LANES} on TPU (lane tiling)")
  if backend == "gpu":
    for name, value in (("block_q", block_q), ("block_kv", block_kv)):
      if value % 64 or value > 256:
        raise ValueError(f"{name}={value} must be a multiple of 64 and at most 256 on GPU (wgmma tiles of one "
                         f"warpgroup); the layout {block_size=} allows it only if it is a multiple of 64")
    if head_dim % 64 or head_dim > 128:
      raise ValueError(f"{head_dim=} must be 64 or 128 on GPU (128-byte swizzled wgmma operands; the double-buffered "
                       f"tiles of the backward kernels must fit in shared memory)")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      raise ValueError(f"dtype={jnp.dtype(dtype).name} is not supported by the GPU kernel (wgmma operands): "
                       f"use bfloat16 or float16, or implementation='xla'")
  return block_q, block_kv


def block_sparse_attention_pallas(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                                  layout_HxNxN: np.ndarray, *, block_size: int, causal: bool = False,
                                  scale: float | None = None, kv_mask: jax.Array | None = None,
                                  block_sizes: BlockSizes | None = None, backend: Backend = "tpu",
                                  interpret=False) -> jax.Array:
  """Block-sparse attention through the Pallas kernels of `backend` ("tpu" or "gpu"), `[B, L, H, D]` in and out.

  `interpret` (True or the backend's interpret params) runs the kernels on CPU. Shapes and the layout are assumed
  checked by `kernels.block_sparse_attention`; the tiling constraints are checked here.
  """
  layout = np.asarray(layout_HxNxN, bool)
  block_q, block_kv = check_supported(q_BxLxHxD.shape, q_BxLxHxD.dtype, block_size, block_sizes, backend)
  scale = q_BxLxHxD.shape[-1] ** -0.5 if scale is None else float(scale)
  tables = make_tables(layout, block_size, block_q, block_kv, causal)
  st = _Static(tables=tables, key=(layout.shape, layout.tobytes(), block_size), block_q=block_q, block_kv=block_kv,
               causal=bool(causal), scale=scale, backend=backend, interpret=interpret)
  to_bhld = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
  out = _attention(st, to_bhld(q_BxLxHxD), to_bhld(k_BxLxHxD), to_bhld(v_BxLxHxD),
                   None if kv_mask is None else kv_mask.astype(bool))
  return to_bhld(out)


__all__ = ["BlockSizes", "Tables", "accelerator_backend", "block_sparse_attention_pallas", "check_supported",
           "make_tables", "tile_layout"]
