"""Pieces every block-sparse implementation shares: kernel tile sizes, the static call description, and the
counter-based dropout mask (the same bits in the reference, the XLA form and the Pallas kernels)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kernels.common import MASK_VALUE, dropout_keep, dropout_seed, keep_threshold
from kernels.platform import Backend

NEG = MASK_VALUE  # kept for the block-sparse modules until they import kernels.common directly



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


__all__ = ["Backend", "BlockSizes", "KernelStatic", "MAX_SUB_BLOCKS", "NEG", "dropout_keep", "dropout_seed",
           "keep_threshold", "sub_blocks"]
