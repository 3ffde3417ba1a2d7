"""Functional attention cores (`[batch, length, heads, head_dim]` tensors) and their Pallas kernels.

One folder per op (`kernels/<op>/`: public entry and dispatch, reference, xla form, one module per backend kernel);
platform helpers once (`kernels.platform`: kernel choice where the program is lowered, fallback log;
`kernels.mosaic_gpu`: Mosaic GPU building blocks). `implementation` selects "reference", "xla", "pallas",
"interpret" or None (the kernel of the platform the program is lowered for). See docs/architecture.md
"Functional cores".
"""

from kernels.linear_attention import linear_attention
from kernels.block_sparse import block_sparse_attention
from kernels.softmax import softmax_attention
from kernels.block_diagonal import block_diagonal_attention
from kernels.sinkhorn import sinkhorn_normalize
