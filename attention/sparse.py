"""Fixed-pattern sparse attention: local, Sparse Transformer, Longformer and BigBird as flex mask functions.

Each variant is a token-level mask function (`mask_mod`, from `attention.sparse_layouts`, whose docstrings say which
mask each one is) for the padded length, run by `kernels.flex.flex_attention` with tiles of `block_size` tokens: the
pattern is constant on those tiles, so empty tiles are never visited and full ones pay no mask work, and memory and
time grow with the number of allowed blocks rather than with length squared. The block layout (`layout`, for the
halo exchange of a sequence-sharded call and for plots) is the same mask at one token per block. Patterns are applied
at block granularity: every size
option (`window`, `stride`, `c`, `num_global_blocks`, `num_random_blocks`) counts blocks of `block_size` tokens, so a
paper's token window `w` is `w / block_size` blocks here, and a global block makes all of its tokens global.

Lengths that are not a multiple of `block_size` are padded internally with zero queries/keys/values; the padded keys
are masked out (as are the caller's padded keys, through `mask`) and the padded outputs are dropped. `dropout_rate`
is applied to the attention weights of the allowed blocks.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, ClassVar, Literal, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention import sparse_layouts
from attention.base import AttentionLayer
from attention.registry import register
from attention.ranges import Constraint, Integer, OneOf
from kernels import sequence as sequence_lib
from kernels.block_sparse import IMPLEMENTATIONS
from kernels.flex import flex_attention
from kernels.block_sparse.sequence_parallel import halo_block_sparse_attention, halo_refusal


class BlockSparseAttention(AttentionLayer):
  """Shared machinery of the sparse variants (not registered itself): subclasses provide `layout`.

  Attributes (besides the common ones of `AttentionLayer`):
    block_size: tokens per block; lengths are padded to a multiple of it internally.
    implementation: `kernels.block_sparse_attention`'s implementation; None = best available.
  """

  block_size: int = 32
  implementation: str | None = None
  option_ranges = {"block_size": Integer(1), "implementation": OneOf(IMPLEMENTATIONS)}

  def kernel_tiles(self) -> int | None:
    """Flex tiles for this layer (the mask is token-level, so any tile size gives the same values). A multiple of
    `block_size` keeps the pattern's own tiles full (no mask work; BigBird's random-block table then never has to be
    evaluated inside a kernel); 64 is the smallest tile the GPU kernels take (so 32-token blocks run in 64-token tiles
    whose partial tiles evaluate the mask); None: flex's default tiles."""
    if self.block_size % 64 == 0 and self.block_size <= 128:
      return self.block_size
    if 64 % self.block_size == 0:
      return 64
    return None

  def mask_mod(self, num_blocks: int, block_size: int) -> Callable:
    """The pattern as a token-level `mask_mod(b, h, q_idx, kv_idx)` over `num_blocks` blocks of `block_size` tokens
    (causal ones included `kv_idx <= q_idx`)."""
    raise NotImplementedError

  def layout(self, num_blocks: int) -> np.ndarray:
    """The bool `[num_heads or 1, num_blocks, num_blocks]` block layout: the mask at one token per block."""
    return sparse_layouts.layout_of(self.mask_mod(num_blocks, 1), self.num_heads, num_blocks)

  def sequence_parallel_form(self) -> str | None:
    # A band layout exchanges halos; what the halo cannot serve (`halo_refusal`: other layouts, attention dropout)
    # gathers K/V in __call__ (the exact fallback, recorded with its reason), so the projections stay sharded here.
    return None if self.decode else "halo"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    q, k, v = self.project_qkv(x)
    batch, length = x.shape[:2]
    seq = sequence_lib.active() if not self.decode else None
    pad = -length % self.block_size
    key_mask_BxL = None if mask is None else mask.astype(bool)
    if pad:
      q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
      real = jnp.ones((batch, length), bool) if key_mask_BxL is None else key_mask_BxL
      key_mask_BxL = jnp.pad(real, ((0, 0), (0, pad)), constant_values=False)
    layout_HxNxN = self.layout((length + pad) // self.block_size)
    y, dropout_rng = None, self.dropout_rng(deterministic)  # drawn once: each call takes a new key
    if seq is not None:  # the halo form when it can serve every option of the call, else the exact fallback
      refusal = halo_refusal(layout_HxNxN, length=length + pad, block_size=self.block_size, causal=self.causal,
                             size=seq.size, implementation=self.implementation, dropout=dropout_rng is not None)
      if refusal is None:
        y = halo_block_sparse_attention(q, k, v, layout_HxNxN, block_size=self.block_size, causal=self.causal,
                                        key_mask_BxL=key_mask_BxL, implementation=self.implementation)
      else:
        k, v = (sequence_lib.fallback_gather(t, type(self).__name__, refusal) for t in (k, v))
    if y is None:
      y = flex_attention(q, k, v, mask_mod=self.mask_mod(layout_HxNxN.shape[-1], self.block_size),
                         key_mask=key_mask_BxL, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
                         implementation=self.implementation, block_size=self.kernel_tiles())
    return self.project_out(y[:, :length], x.shape[-1])


@register("local")
class LocalAttention(BlockSparseAttention):
  """Local (banded) attention: each block attends to `window` blocks around it (odd `window`; `window=1` is LRA's
  block-diagonal local attention); causal: to itself and the `window - 1` blocks before it."""

  window: int = 3
  option_ranges = {"window": Integer(1)}
  option_constraints = (sparse_layouts.BIDIRECTIONAL_WINDOW,)

  def mask_mod(self, num_blocks: int, block_size: int) -> Callable:
    del num_blocks
    return sparse_layouts.local_mask(block_size=block_size, window=self.window, causal=self.causal)


@register("sparse_transformer")
class SparseTransformerAttention(BlockSparseAttention):
  """Sparse Transformer (Child et al., 2019), "strided" or "fixed" pattern, with the two attention heads of the paper
  merged (every head attends to the union). `stride` (the paper's l) and `c` count blocks. Causal as in the paper, or
  bidirectional (mirrored pattern) for encoders.

  Cost: a row sees about `stride` (bidirectional: `2 * stride`) neighbouring blocks plus `num_blocks / stride`
  strided (or summary, times `c`) blocks, so the total is O(N * (stride + N / stride)) blocks of `block_size^2` scores
  for N blocks. `stride=None` (default) uses `sparse_layouts.default_stride(N)` = round(sqrt(N)) of the padded length,
  the paper's l ~ sqrt(n): O(N * sqrt(N)) blocks, i.e. n*sqrt(n) in tokens. A fixed `stride` gives
  O(N^2 / stride) blocks: linear per row, quadratic overall, as the length grows."""

  pattern: Literal["strided", "fixed"] = "strided"
  stride: int | None = None
  c: int = 1

  PATTERNS: ClassVar[tuple[str, ...]] = ("strided", "fixed")
  option_ranges = {"pattern": OneOf(PATTERNS), "stride": Integer(1, allow_none=True), "c": Integer(1)}
  option_constraints = (sparse_layouts.SUMMARY_BLOCKS,)

  def mask_mod(self, num_blocks: int, block_size: int) -> Callable:
    # The automatic stride never goes below c (a chunk must hold its summary blocks); a set stride is checked as is.
    stride = max(sparse_layouts.default_stride(num_blocks), self.c) if self.stride is None else self.stride
    if self.pattern == "strided":
      return sparse_layouts.strided_mask(block_size=block_size, stride=stride, causal=self.causal)
    # "fixed": the gate refused any other pattern (option_ranges) when the layer was built.
    return sparse_layouts.fixed_mask(block_size=block_size, stride=stride, c=self.c, causal=self.causal)


@register("longformer")
class LongformerAttention(BlockSparseAttention):
  """Longformer (Beltagy et al., 2020): a sliding window of `window` blocks plus `num_global_blocks` global blocks at
  the start (covering a CLS token at position 0). The last `num_dilated_heads` heads dilate their window by
  `dilation` (the paper dilates 2 heads in upper layers). Global tokens make it non-causal; with
  `num_global_blocks=0` it can be causal (the paper's autoregressive language models)."""

  window: int = 3
  num_global_blocks: int = 1
  dilation: int = 1
  num_dilated_heads: int = 2
  option_ranges = {"window": Integer(1), "num_global_blocks": Integer(0), "dilation": Integer(1),
                   "num_dilated_heads": Integer(0)}
  option_constraints = (
      sparse_layouts.BIDIRECTIONAL_WINDOW,
      # Checked by the gate when the layer is built (it reads the model's num_heads), never again at a call.
      Constraint("num_dilated_heads", ("num_heads", "dilation"),
                 lambda num_heads, dilation: Integer(0, num_heads) if dilation > 1 else None,
                 why="the last num_dilated_heads heads dilate their window; use num_dilated_heads <= num_heads"),
  )

  supports_causal = False
  not_causal_reason = ("global tokens see and are seen by every position, future ones included; set "
                       "num_global_blocks=0 for the causal sliding-window Longformer")

  @classmethod
  def causal_refusal(cls, options: Mapping[str, Any]) -> str | None:
    # The paper's causal sliding window: causal exactly when there are no global blocks.
    return None if options.get("num_global_blocks", cls.num_global_blocks) == 0 else cls.not_causal_reason

  def mask_mod(self, num_blocks: int, block_size: int) -> Callable:
    del num_blocks
    dilation = 1
    if self.dilation > 1:  # the gate held num_dilated_heads to [0, num_heads] when the layer was built
      dilated = self.num_dilated_heads
      dilation = (1,) * (self.num_heads - dilated) + (self.dilation,) * dilated
    return sparse_layouts.longformer_mask(block_size=block_size, window=self.window,
                                          num_global_blocks=self.num_global_blocks, dilation=dilation,
                                          causal=self.causal)


@register("bigbird")
class BigBirdAttention(BlockSparseAttention):
  """BigBird-ITC (Zaheer et al., 2020): a window of `window` blocks, `num_global_blocks` global blocks at the start and
  `num_random_blocks` random blocks per row and head. The random blocks are fixed per layer: drawn on the host from
  `seed` and the layer's module path, so layers differ and the same model always gets the same pattern."""

  block_size: int = 64
  window: int = 3
  num_global_blocks: int = 2
  num_random_blocks: int = 3
  seed: int = 0
  option_ranges = {"window": Integer(1, odd=True), "num_global_blocks": Integer(0), "num_random_blocks": Integer(0),
                   "seed": Integer(0)}  # bidirectional only, so the centred window is always odd

  supports_causal = False
  not_causal_reason = "global tokens see and are seen by every position, and random blocks reach into the future"

  def mask_mod(self, num_blocks: int, block_size: int) -> Callable:
    path = self.path if self.scope is not None else ()  # unbound (e.g. for plotting): the root's pattern
    path_hash = zlib.crc32("/".join(map(str, path)).encode())
    return sparse_layouts.bigbird_mask(num_blocks, block_size=block_size, window=self.window,
                                       num_global_blocks=self.num_global_blocks,
                                       num_random_blocks=self.num_random_blocks, num_heads=self.num_heads,
                                       seed=(self.seed, path_hash))
