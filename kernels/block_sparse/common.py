"""Pieces every block-sparse implementation shares: kernel tile sizes, the static call description, and the
counter-based dropout mask (the same bits in the reference, the XLA form and the Pallas kernels)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Backend = Literal["tpu", "gpu"]
NEG = float(jnp.finfo(jnp.float32).min)  # finite floor for masked scores: empty rows stay finite


# A GPU tile larger than the layout block carries which of its layout blocks are allowed as bits of one int32.
MAX_SUB_BLOCKS = 31


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Kernel tile sizes in tokens.

  None picks the backend default: on TPU the largest power-of-two divisor of `block_size` up to 128 (the MXU
  width; a tile lies inside one layout block), on GPU 64 (the wgmma rows of one warpgroup). On GPU a tile may also
  span several layout blocks (`block_size` 16 or 32 with 64-token tiles): the kernels then mask the layout's blocks
  inside each tile (`sub_blocks`), so the 32-token layouts of local, longformer and sparse_transformer run there too.
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
      if block_size % value == 0 or (backend == "gpu" and value % block_size == 0):
        continue
      spans = " or be a multiple of it (a tile spanning whole layout blocks)" if backend == "gpu" else ""
      raise ValueError(f"{name}={value} must divide the layout {block_size=}{spans}")
    rows, cols = sub_blocks(block_size, int(bq), int(bkv))
    if (rows, cols) != (1, 1) and block_size & (block_size - 1):
      # The kernels find a token's block inside a tile by a shift: integer division is not a Mosaic GPU vector op.
      raise ValueError(f"tiles {bq}x{bkv} spanning layout blocks need a power-of-two block_size, got {block_size=}; "
                       f"use block_size 16, 32 or a multiple of the tile, or implementation='xla'")
    if rows * cols > MAX_SUB_BLOCKS:
      raise ValueError(f"a {bq}x{bkv}-token tile spans {rows}x{cols} layout blocks of {block_size=}; the GPU kernels "
                       f"mask at most {MAX_SUB_BLOCKS} per tile: use block_size >= {max(bq, bkv) // 4} (or a "
                       f"multiple of 64), or implementation='xla'")
    return int(bq), int(bkv)


def sub_blocks(block_size: int, block_q: int, block_kv: int) -> tuple[int, int]:
  """How many layout blocks a `block_q x block_kv` tile spans along queries and keys ((1, 1): it lies in one)."""
  return max(block_q // block_size, 1), max(block_kv // block_size, 1)


@dataclasses.dataclass(frozen=True)
class KernelStatic:
  """Everything static about one kernel call (hashable, so it rides through custom_vjp as a non-differentiable
  argument); shared by the TPU and GPU kernel modules. `tables` is a `tables.KernelTables`."""

  tables: object = dataclasses.field(hash=False, compare=False)
  key: tuple  # what identifies `tables`
  block_q: int
  block_kv: int
  causal: bool
  scale: float
  backend: Backend
  interpret: object  # False, True, or a pltpu.InterpretParams / InterpretGPUParams
  dropout_rate: float = 0.0
  heads: int = 1  # query heads (the dropout counter is batch * heads + head)
  layout_block: int = 0  # the layout's block size in tokens
  sub_blocks: tuple[int, int] = (1, 1)  # layout blocks per tile (queries, keys): > 1 masks blocks inside a tile

  @property
  def keep_threshold(self) -> int:
    return keep_threshold(self.dropout_rate)


# ----------------------------------------------------------------------------------------------------------------------
# Dropout: a counter-based hash of (seed, batch * heads + head, query position, key position), so a backward kernel
# regenerates the forward's mask from the seed alone.

_KEEP_BITS = 24  # the top 24 bits of the hash decide: keep when bits < (1 - rate) * 2^24


def _i32(c: int) -> int:
  """A uint32 constant as the int32 of the same bits (int32 arithmetic wraps like uint32: same bits, and Mosaic
  lowers int32 everywhere)."""
  return c - (1 << 32) if c >= 1 << 31 else c


def _shr(x: jax.Array, bits: int) -> jax.Array:
  # A broadcast numpy constant, not `jnp.full_like`: under the training step's mesh `full_like` of a scalar traces a
  # `reshard` of a literal, which Mosaic GPU cannot lower inside a kernel ("Shaped arrays must be represented by
  # ir.Values").
  return jax.lax.shift_right_logical(x, jax.lax.broadcast(np.int32(bits), np.shape(x)))


def _fmix(x: jax.Array) -> jax.Array:
  x = x ^ _shr(x, 16)
  x = x * _i32(0x85EBCA6B)
  x = x ^ _shr(x, 13)
  x = x * _i32(0xC2B2AE35)
  return x ^ _shr(x, 16)


def keep_threshold(rate: float) -> int:
  """Integer threshold on `_KEEP_BITS` hash bits: a weight is kept when its bits fall below it (P = 1 - rate)."""
  return int(round((1.0 - rate) * (1 << _KEEP_BITS)))


def dropout_keep(seed, batch_head, q_pos, k_pos, rate: float) -> jax.Array:
  """Bool keep-mask (True = keep) for broadcastable int32 counters; `seed` an int32 scalar (`dropout_seed`).

  `batch_head = batch * heads + head`, positions are token indices in the (padded) sequence. Deterministic in its
  arguments only, so any tiling of the scores (XLA gathers, kernel tiles, a backward kernel) regenerates the same
  mask. Plain int32 multiplies, xors and logical shifts (murmur3's finalizer) so it runs in XLA and in the Pallas
  kernels alike.
  """
  i = lambda a: jnp.asarray(a).astype(jnp.int32)  # noqa: E731
  x = _fmix(i(seed) ^ (i(batch_head) * _i32(0x9E3779B1)))
  x = _fmix(x ^ (i(q_pos) * _i32(0x85EBCA77)))
  x = _fmix(x ^ (i(k_pos) * _i32(0xC2B2AE3D)))
  return _shr(x, 32 - _KEEP_BITS) < keep_threshold(rate)


def dropout_seed(rng: jax.Array) -> jax.Array:
  """int32 scalar seed of the dropout hash drawn from a jax PRNG key (typed or raw)."""
  return jax.lax.bitcast_convert_type(jax.random.bits(rng, (), jnp.uint32), jnp.int32)


__all__ = ["Backend", "BlockSizes", "KernelStatic", "MAX_SUB_BLOCKS", "NEG", "dropout_keep", "dropout_seed",
           "keep_threshold", "sub_blocks"]
