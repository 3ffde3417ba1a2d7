"""Compatibility shim, re-exports only: the block-sparse pieces now live in the op template's modules
(`kernels.common`: `MASK_VALUE`, the dropout hash; `kernels.block_sparse.tables`: tiles, the static call
description). Kept because `kernels/block_sparse/xla.py` (rewritten in parallel, issue 21) imports `NEG` and
`dropout_keep` from here; delete this file once nothing imports it."""

from kernels.block_sparse.tables import MAX_SUB_BLOCKS, BlockSizes, KernelStatic, sub_blocks
from kernels.common import MASK_VALUE, dropout_keep, dropout_seed, keep_threshold
from kernels.platform import Backend

NEG = MASK_VALUE

__all__ = ["Backend", "BlockSizes", "KernelStatic", "MAX_SUB_BLOCKS", "NEG", "dropout_keep", "dropout_seed",
           "keep_threshold", "sub_blocks"]
