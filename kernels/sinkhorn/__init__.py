"""Sinkhorn balancing of block-sorting scores (Sparse Sinkhorn attention): the public entry."""

from kernels.sinkhorn.reference import NEG, sinkhorn_normalize

__all__ = ["NEG", "sinkhorn_normalize"]
