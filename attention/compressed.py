"""Memory-compressed attention (Liu et al., ICLR 2018, "Generating Wikipedia by Summarizing Long Sequences").

Keys and values are shortened by a strided convolution (kernel = stride = `factor`, over the length, all heads'
channels at once); every query attends to the `L / factor` compressed tokens. Causal: a compressed token is visible
once the last position of its span is in the query's past (so the first `factor - 1` positions see nothing from
this branch). Padded positions are zeroed before the convolution and a span without a real position is masked.

`mode="local"` is the paper's other layer: attention within non-overlapping blocks of `block_size` tokens (causal
inside a block). The paper's decoder (T-DMCA) alternates the two, L-M-L-M-L: that is this variant's per-layer
schedule (`default_layer_options`), and `mode` set by the user pins every layer.

The paper's defaults: factor=3 (kernel and stride 3), block_size=256 for local layers; they are this layer's
defaults. Decoding keeps every key and value; the convolution of a span is final once its last position is written,
so stepping equals the parallel causal output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention import adaptive_sparse as core
from attention.base import AttentionLayer, default_kernel_init
from attention.registry import register
from attention.ranges import Integer, OneOf

MODES = ("compressed", "local")


@register("compressed")
class MemoryCompressedAttention(AttentionLayer):
  """Attributes: mode ("compressed" | "local"), factor (3: the convolution's kernel and stride), block_size (256,
  local mode), query_chunk (queries per chunk of the compressed mode's XLA form), implementation (None: the local
  blocks through flex's kernels on tpu/cuda, the block-major XLA form elsewhere; "flex" | "xla" | "reference": dense
  token masks)."""

  mode: str = "compressed"
  factor: int = 3
  block_size: int = 256
  query_chunk: int = core.DEFAULT_QUERY_CHUNK
  implementation: str | None = None
  option_ranges = {"implementation": OneOf(core.IMPLEMENTATIONS, what="compressed implementation"),
                   "mode": OneOf(MODES), "factor": Integer(1), "block_size": Integer(1), "query_chunk": Integer(1)}

  supports_decode = True

  @classmethod
  def default_layer_options(cls, num_layers: int) -> tuple[dict, ...]:
    """The paper's T-DMCA: local and memory-compressed layers alternate, starting (and ending, for odd depth) local."""
    return tuple({"mode": MODES[(i + 1) % 2]} for i in range(num_layers))

  def _conv(self, t_BxSxHxD: jax.Array, which: str) -> jax.Array:
    """The strided convolution (kernel = stride = factor) as one dense map of each span of `factor` positions."""
    b, s, h, d = t_BxSxHxD.shape
    spans = t_BxSxHxD.reshape(b, s // self.factor, self.factor, h * d)
    out = self.dense(h * d, f"compress_{which}", axis=(-2, -1), kernel_init=default_kernel_init)(spans)
    return out.reshape(b, s // self.factor, h, d)

  def _attend(self, q, k, v, real_BxS, q_offset, seed, causal: bool) -> jax.Array:
    d = q.shape[-1]
    rate = self.dropout_rate if seed is not None else 0.0
    kw = dict(scale=d ** -0.5, q_offset=q_offset, dropout_rate=rate, query_chunk=self.query_chunk)
    if self.mode == "local":
      own = ((q_offset + jnp.arange(q.shape[1])) // self.block_size).astype(jnp.int32)
      idx = jnp.broadcast_to(own[None, :, None, None], (q.shape[0], q.shape[1], k.shape[2], 1))
      return core.selected_attention(q, k, v, idx, block_size=self.block_size, causal=causal, key_mask_BxS=real_BxS,
                                     dropout_rng=core.branch_rng(seed, 0), implementation=self.implementation, **kw)
    zero = lambda t: t * real_BxS[..., None, None].astype(t.dtype)  # noqa: E731
    kc, vc = self._conv(zero(k), "key"), self._conv(zero(v), "value")
    n = kc.shape[1]
    valid = jnp.any(real_BxS.reshape(real_BxS.shape[0], n, self.factor), axis=-1)
    ends = (np.arange(n, dtype=np.int32) + 1) * self.factor - 1
    return core.summary_attention(q, kc, vc, k_pos_S=ends, key_valid_BxS=valid, causal=causal,
                                  dropout_seed=core.branch_seed(seed, 0),
                                  implementation="reference" if self.implementation == "reference" else "xla", **kw)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    b, length, features = x.shape
    q, k, v = self.project_qkv(x)
    drop = self.dropout_rng(deterministic)
    seed = drop  # a key: each branch folds in its own
    multiple = self.factor if self.mode == "compressed" else self.block_size
    padded = length + (-length % multiple)
    if self.decode:
      step = self.ring_cache("cached", padded, {"key": k, "value": v}, mask)
      if step is not None:
        cached, valid, t = step
        return self.project_out(self._attend(q, cached["key"], cached["value"], valid, t, seed, True), features)
    real = core.pad_length(jnp.ones((b, length), bool) if mask is None else mask.astype(bool), multiple, value=False)
    pad = lambda t: core.pad_length(t, multiple)  # noqa: E731
    return self.project_out(self._attend(q, pad(k), pad(v), real, 0, seed, self.causal), features)


__all__ = ["MODES", "MemoryCompressedAttention"]
