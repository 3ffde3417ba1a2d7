"""Functional attention cores (`[batch, length, heads, head_dim]` tensors) and their Pallas kernels.

Each kernel module holds the kernel, its pure-jnp reference and its custom_vjp; `implementation` selects
"reference", "xla", "pallas", "interpret" or None (best available). The linear-attention and block-sparse cores land
with their issues (see DESIGN.md "Functional cores").
"""

from kernels.linear_attention import linear_attention
from kernels.block_sparse import block_sparse_attention
