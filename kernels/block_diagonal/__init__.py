"""Block-diagonal softmax attention (TransNormer's DiagAttention): the public entry. Only the reference form exists;
its cost is already linear in length (`L * block_size`)."""

from kernels.block_diagonal.reference import block_diagonal_attention

__all__ = ["block_diagonal_attention"]
