"""MoBA, Mixture of Block Attention (Lu et al., Moonshot AI, 2025): each query attends to the top-k key blocks by a
gate on mean-pooled keys.

The keys are cut into blocks of `block_size`; block j's gate for query t (per head) is `q_t . mean(k in block j)`
(the mean over its real keys). A query attends token by token to the `top_k` blocks with the largest gates, its own
block always among them (causal: blocks after its own are out, and inside its own block the usual causal mask holds);
ties go to the lower block index. Selection is integer top-k inside the step, not differentiated (as in the paper).
Bidirectional too (every block may be selected).

`coarse=True` adds the coarse stage of VSA (Zhang et al., 2025, "Video Sparse Attention"): attention over the
pooled keys and pooled values of all blocks (causal: a pooled block once its last token is in the past), summed
with the fine (selected) output.

The paper's defaults: block_size=512, top_k=3 at 8K (its ablations; 4096 / 12 at 1M), per head, no shared
selection. They are this layer's defaults (`top_k=None`: 3, or every block of a shorter sequence); scale `block_size` to shorter sequences by options. Decoding keeps every
key and value and selects per step (a past block's pooled key is final once the block is; the own block is always
in), so stepping equals the parallel causal output. The selected blocks run, by default (`implementation=None`),
through the key-block-major XLA form on CPU and flex's kernels with traced tile lists on tpu/cuda (see
attention/nsa.py); "flex", "xla" and "reference" (dense token masks) force one form.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention import adaptive_sparse as core
from attention.base import AttentionLayer
from attention.registry import register
from attention.ranges import Integer, OneOf


def pooled(t_BxSxHxD: jax.Array, real_BxS: jax.Array, block_size: int) -> jax.Array:
  """Mean over each block's real positions: `[B, S / block_size, H, D]` (zeros where a block has none)."""
  b, s, h, d = t_BxSxHxD.shape
  w = real_BxS.astype(jnp.float32).reshape(b, s // block_size, block_size, 1, 1)
  total = jnp.sum(t_BxSxHxD.astype(jnp.float32).reshape(b, s // block_size, block_size, h, d) * w, axis=2)
  return total / jnp.maximum(jnp.sum(w, axis=2), 1.0)


def gate_scores(q_BxLxHxD: jax.Array, kmean_BxNxHxD: jax.Array, q_pos_L: jax.Array, first_real_BxN: jax.Array, *,
                block_size: int, causal: bool, num_keys: int) -> jax.Array:
  """`[B, L, H, N]` gates with MoBA's rules: the own block +inf, blocks not reached (causal) or empty -inf."""
  scores = jnp.einsum("blhd,bnhd->blhn", q_BxLxHxD.astype(jnp.float32), kmean_BxNxHxD)
  own = (q_pos_L // block_size)[:, None]
  blocks = jnp.arange(kmean_BxNxHxD.shape[1])[None, :]
  reach = q_pos_L[:, None] if causal else num_keys - 1
  allowed = (first_real_BxN[:, None, :] <= reach) & ((blocks <= own)[None] if causal else True)
  scores = jnp.where((blocks == own)[None, :, None], jnp.inf, scores)
  return jnp.where(allowed[:, :, None], scores, -jnp.inf)


PAPER_TOP_K = 3


@register("moba")
class MixtureOfBlockAttention(AttentionLayer):
  """Attributes: block_size (512), top_k (None = 3, or every block of a shorter sequence; own block included), coarse (VSA's pooled attention added),
  query_chunk (queries per chunk of the coarse stage's XLA form), implementation (None: flex's kernels on tpu/cuda,
  the block-major XLA form elsewhere; "flex" | "xla" | "reference": dense token masks of the same selection)."""

  block_size: int = 512
  top_k: int | None = None
  coarse: bool = False
  query_chunk: int = core.DEFAULT_QUERY_CHUNK
  implementation: str | None = None
  option_ranges = {"implementation": OneOf(core.IMPLEMENTATIONS, what="moba implementation"),
                   "block_size": Integer(1), "top_k": Integer(1, allow_none=True), "query_chunk": Integer(1)}

  supports_decode = True

  def _check(self, padded: int) -> None:
    blocks = padded // self.block_size
    if self.top_k is not None and self.top_k > blocks:
      raise ValueError(f"moba: top_k={self.top_k} is larger than the {blocks} blocks of block_size="
                       f"{self.block_size} in a sequence of {padded}; use top_k <= {blocks}")

  def _attend(self, q, k, v, real_BxS, q_offset, seed, causal: bool) -> jax.Array:
    b, l, h, d = q.shape
    s = k.shape[1]
    scale = d ** -0.5
    kmean = pooled(k, real_BxS, self.block_size)
    first_real = core.first_real_position(real_BxS, b, s, self.block_size)
    q_pos = q_offset + jnp.arange(l)
    idx = core.top_blocks(gate_scores(q, kmean, q_pos, first_real, block_size=self.block_size, causal=causal,
                                      num_keys=s), self.top_k or min(PAPER_TOP_K, s // self.block_size))
    self.sow("intermediates", "block_idx", idx)
    rate = self.dropout_rate if seed is not None else 0.0
    out = core.selected_attention(q, k, v, idx, block_size=self.block_size, causal=causal, key_mask_BxS=real_BxS,
                                  scale=scale, q_offset=q_offset, dropout_rate=rate,
                                  dropout_rng=core.branch_rng(seed, 0), query_chunk=self.query_chunk,
                                  implementation=self.implementation)
    if self.coarse:
      vmean = pooled(v, real_BxS, self.block_size)
      ends = (np.arange(s // self.block_size, dtype=np.int32) + 1) * self.block_size - 1
      out = out + core.summary_attention(q, kmean, vmean, k_pos_S=ends, key_valid_BxS=first_real < s, causal=causal,
                                         scale=scale, q_offset=q_offset, dropout_rate=rate,
                                         dropout_seed=core.branch_seed(seed, 1), query_chunk=self.query_chunk,
                                         implementation="reference" if self.implementation == "reference"
                                         else "xla")
    return out

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    b, length, features = x.shape
    q, k, v = self.project_qkv(x)
    drop = self.dropout_rng(deterministic)
    seed = drop  # a key: each branch folds in its own
    real = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
    padded = length + (-length % self.block_size)
    if self.decode:
      step = self.ring_cache("cached", padded, {"key": k, "value": v}, mask)
      if step is not None:
        cached, valid, t = step
        self._check(valid.shape[1])
        out = self._attend(q, cached["key"], cached["value"], valid, t, seed, True)
        return self.project_out(out, features)
    self._check(padded)
    pad = lambda t: core.pad_length(t, self.block_size)  # noqa: E731
    out = self._attend(q, pad(k), pad(v), core.pad_length(real, self.block_size, value=False), 0, seed,
                       self.causal)
    return self.project_out(out, features)


__all__ = ["MixtureOfBlockAttention", "gate_scores", "pooled"]
