"""Functional attention cores (`[batch, length, heads, head_dim]` tensors) and their Pallas kernels.

One folder per op, every one on the template of `kernels.common.OP_FILES` (`__init__.py` entry and dispatch,
`reference.py`, `xla.py`, `tables.py`, the driver `pallas.py` over `pallas_tpu.py` and `pallas_gpu.py`); platform
helpers once (`kernels.platform`: `Backend`, kernel choice where the program is lowered, fallback log;
`kernels.mosaic_gpu`: Mosaic GPU building blocks; `kernels.common`: `MASK_VALUE`, the dropout hash).
`implementation` selects "reference", "xla", "pallas", "interpret" or None (the best for the platform the program is
lowered for), and `key_mask` (bool [batch, keys], True = a real key) masks padded keys, in every op. See
docs/architecture.md "Functional cores".
"""

__project__ = "efficient-attention"  # this project's package, not another of the same name (attention/packages.py)

from kernels.linear_attention import linear_attention
from kernels.block_sparse import block_sparse_attention
from kernels.softmax import softmax_attention
from kernels.block_diagonal import block_diagonal_attention
from kernels.sinkhorn import sinkhorn_normalize
