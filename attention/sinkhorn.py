"""Sparse Sinkhorn attention (Tay et al., 2020): attention within blocks re-ordered by a learned soft permutation.

The sequence is cut into `N` blocks of `block_size` tokens (padded internally to a multiple). Per head:
1. SortNet: each block's summary (the mean of its real keys) goes through a two-layer MLP,
   `R_i = W_B relu(W_P s_i + b_P) + b_B`, giving block `i`'s scores over the `N` source blocks: `R: [N, N]`.
2. Sinkhorn: `S = sinkhorn_normalize((R + gumbel) / temperature, sinkhorn_iters)`, a soft permutation (doubly
   stochastic); Gumbel noise (`gumbel_noise=True`) is drawn from the `attention` rng in training only.
3. Sorted block `i` = `sum_j S_ij block_j` of keys and values; queries of block `i` attend to sorted block `i`
   concatenated with their own (local) block.
SortCut (`sortcut_k > 0`): every query attends to the first `sortcut_k` sorted blocks only (no local block); an
encoder-only variant (it cannot be causal). When a sequence has fewer blocks, all of them are kept.

Causal mode (`causal=True`), the paper's causal sorting: block `i` may only receive source blocks `j < i`; its SortNet
summary is the running mean of all keys up to and including its first token (a cumulative sum), the only content
every query of the block may see; Sinkhorn balancing is causal: rows are normalized over the eligible (past) source
blocks, and each entry's column normalization sums only over rows up to its own (`jax.lax.cumlogsumexp`), so row `i`
never depends on later blocks. (Normalizing whole columns, as non-causal Sinkhorn does, would let later blocks' scores
reach earlier rows through the column sums.) Within the local block the usual causal mask applies. Note that the only
doubly stochastic matrix supported on past blocks is the shift by one block, so many causal iterations pull each
block's sorted keys toward the previous block; `sinkhorn_iters=0` (a softmax over past blocks) keeps the sort free.

Padding: padded keys and values are zeroed and masked, fully padded blocks take no part in the balancing, and a
sorted key is the mixture of real keys only (renormalized by their total weight), so padded content never reaches a
real output.

Deviations: summaries are means rather than the paper's sums (same up to a per-length scale the first layer could
learn; keeps logits comparable across block sizes and padding); the SortNet output width is `max_num_blocks`
(0 = the number of blocks of the input at init) and shorter inputs use its first columns. Defaults: `block_size=64`,
`sinkhorn_iters=5`, `temperature=0.75`, no Gumbel noise. The LRA code used `block_size=50` and a plain softmax over
the SortNet scores ("softmax sort", `sort_activation="softmax"`; here `sinkhorn_iters=0`) rather than Sinkhorn
balancing, with a single-layer SortNet on summed keys.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import AttentionLayer
from attention.linformer import resolve_max_length
from attention.registry import register
from attention.ranges import Integer, Real
from kernels.common import MASK_VALUE
from kernels.sinkhorn import sinkhorn_normalize
from kernels.softmax import dropout_weights, softmax_attention_reference

__all__ = ["SinkhornAttention", "sinkhorn_normalize", "sorted_plus_local_attention"]
per_head_init = nn.initializers.xavier_uniform(batch_axis=(0,))


def _block_summaries(k_BxLxHxD: jax.Array, real_BxL: jax.Array, block_size: int, causal: bool) -> jax.Array:
  """`[B, N, H, D]` mean of real keys per block; causal: running mean up to each block's first token."""
  b, length, h, d = k_BxLxHxD.shape
  n = length // block_size
  k_BxLxHxD = k_BxLxHxD.astype(jnp.float32)  # running sums over the sequence: float32 whatever the compute dtype
  weight = real_BxL.astype(jnp.float32)
  if causal:
    total = jnp.cumsum(k_BxLxHxD, axis=1)[:, ::block_size]
    count = jnp.cumsum(weight, axis=1)[:, ::block_size]
  else:
    total = k_BxLxHxD.reshape(b, n, block_size, h, d).sum(axis=2)
    count = weight.reshape(b, n, block_size).sum(axis=2)
  return total / jnp.maximum(count, 1.0)[:, :, None, None]


def sorted_plus_local_attention(q_BxNxSxHxD: jax.Array, sorted_k: jax.Array, sorted_v: jax.Array,
                                k_BxNxSxHxD: jax.Array, v_BxNxSxHxD: jax.Array, sorted_real_BxHxNxS: jax.Array,
                                real_BxNxS: jax.Array, *, causal: bool, dropout_rate: float = 0.0,
                                dropout_rng: jax.Array | None = None) -> jax.Array:
  """Each block's queries over [its sorted block; its own block]: `[B, N, S, H, D]`."""
  bs = q_BxNxSxHxD.shape[2]
  keys = jnp.concatenate([sorted_k, k_BxNxSxHxD], axis=2)
  values = jnp.concatenate([sorted_v, v_BxNxSxHxD], axis=2)
  logits = jnp.einsum("bnqhd,bnkhd->bhnqk", q_BxNxSxHxD, keys, preferred_element_type=jnp.float32)
  logits = logits * q_BxNxSxHxD.shape[-1] ** -0.5
  local_allowed = real_BxNxS[:, None, :, None, :]
  if causal:
    local_allowed = local_allowed & (jnp.arange(bs)[:, None] >= jnp.arange(bs)[None, :])
  sorted_allowed = jnp.broadcast_to(sorted_real_BxHxNxS[:, :, :, None, :], logits.shape[:-1] + (bs,))
  allowed = jnp.concatenate([sorted_allowed, jnp.broadcast_to(local_allowed, sorted_allowed.shape)], axis=-1)
  weights = dropout_weights(jax.nn.softmax(jnp.where(allowed, logits, MASK_VALUE), axis=-1), dropout_rate, dropout_rng)
  out = jnp.einsum("bhnqk,bnkhd->bnqhd", weights.astype(values.dtype), values, preferred_element_type=jnp.float32)
  return out.astype(q_BxNxSxHxD.dtype)


@register("sinkhorn")
class SinkhornAttention(AttentionLayer):
  """Attributes: block_size, sinkhorn_iters, temperature, gumbel_noise (training only), sortcut_k (0 = off: sorted
  plus local block; k > 0 = SortCut over the first k sorted blocks), max_num_blocks (0 = the block count at init)."""

  block_size: int = 64
  sinkhorn_iters: int = 5
  temperature: float = 0.75
  gumbel_noise: bool = False
  sortcut_k: int = 0
  max_num_blocks: int = 0
  option_ranges = {"block_size": Integer(1), "sinkhorn_iters": Integer(0), "temperature": Real(0.0, lo_open=True),
                   "sortcut_k": Integer(0), "max_num_blocks": Integer(0)}

  @classmethod
  def causal_refusal(cls, options: Mapping[str, Any]) -> str | None:
    # Asked by the gate when the layer is built (the ranges above are the gate's too): nothing is re-checked per call.
    sortcut_k = options.get("sortcut_k", cls.sortcut_k)
    if sortcut_k:
      return (f"SortCut (sortcut_k={sortcut_k}) lets every query attend to the same leading sorted blocks, future "
              f"ones included; use sortcut_k=0 with causal=True")
    return super().causal_refusal(options)

  def _sortnet(self, summaries_BxNxHxD: jax.Array, num_blocks: int) -> jax.Array:
    """`[B, H, N, N]` scores of destination block i (rows) over source blocks j (columns)."""
    h, d = summaries_BxNxHxD.shape[2:]
    max_blocks = resolve_max_length(self, self.max_num_blocks, num_blocks, "params", "sortnet_out_kernel", -1,
                                    option="max_num_blocks", what=f"number of blocks of {self.block_size} tokens")
    w_p = self.param("sortnet_hidden_kernel", per_head_init, (h, d, d), jnp.float32)
    b_p = self.param("sortnet_hidden_bias", nn.initializers.zeros, (h, d), jnp.float32)
    w_b = self.param("sortnet_out_kernel", per_head_init, (h, d, max_blocks), jnp.float32)
    b_b = self.param("sortnet_out_bias", nn.initializers.zeros, (h, max_blocks), jnp.float32)
    hidden = nn.relu(jnp.einsum("bnhd,hde->bnhe", summaries_BxNxHxD, w_p) + b_p)
    scores = jnp.einsum("bnhe,hem->bhnm", hidden, w_b[:, :, :num_blocks])
    return scores + b_b[None, :, None, :num_blocks]

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    b, length, features = x.shape
    bs = self.block_size
    pad = -length % bs
    n = (length + pad) // bs
    q, k, v = self.project_qkv(x)
    real_BxL = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
    real_BxL = jnp.pad(real_BxL, ((0, 0), (0, pad)))
    pad_seq = lambda t: jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
    keep = real_BxL[:, :, None, None].astype(k.dtype)
    q, k, v = pad_seq(q), pad_seq(k) * keep, pad_seq(v) * keep  # zeroed: padded content cannot be mixed in

    scores_BxHxNxN = self._sortnet(_block_summaries(k, real_BxL, bs, self.causal), n)
    real_BxNxS = real_BxL.reshape(b, n, bs)
    block_real_BxN = real_BxNxS.any(axis=-1)
    eligible = block_real_BxN[:, None, :, None] & block_real_BxN[:, None, None, :]
    if self.causal:
      eligible = eligible & (jnp.arange(n)[:, None] > jnp.arange(n)[None, :])
    if self.gumbel_noise and not deterministic:
      scores_BxHxNxN = scores_BxHxNxN + jax.random.gumbel(self.make_rng("attention"), scores_BxHxNxN.shape)
    s_BxHxNxN = sinkhorn_normalize(scores_BxHxNxN / self.temperature, self.sinkhorn_iters, mask=eligible,
                                   causal=self.causal)

    # Sorted slot (i, s) mixes token s of every source block j with weight S_ij, over real tokens only.
    to_blocks = lambda t: t.reshape(b, n, bs, *t.shape[2:])  # noqa: E731
    k_BxNxSxHxD, v_BxNxSxHxD = to_blocks(k), to_blocks(v)
    weight_BxHxNxS = jnp.einsum("bhij,bjs->bhis", s_BxHxNxN, real_BxNxS.astype(jnp.float32))
    sorted_real_BxHxNxS = weight_BxHxNxS > 0.0
    inv = 1.0 / jnp.where(sorted_real_BxHxNxS, weight_BxHxNxS, 1.0)
    sort = lambda t: jnp.einsum("bhij,bjshd,bhis->bishd", s_BxHxNxN, t, inv).astype(t.dtype)  # noqa: E731
    sorted_k, sorted_v = sort(k_BxNxSxHxD), sort(v_BxNxSxHxD)

    dropout_rng = self.dropout_rng(deterministic)
    if self.sortcut_k:
      kept = min(self.sortcut_k, n)
      flat = lambda t: t[:, :kept].reshape(b, kept * bs, *t.shape[3:])  # noqa: E731
      key_mask = sorted_real_BxHxNxS[:, :, :kept].reshape(b, -1, 1, kept * bs)
      y = softmax_attention_reference(q, flat(sorted_k), flat(sorted_v), mask=key_mask, dropout_rate=self.dropout_rate,
                                      dropout_rng=dropout_rng)
    else:
      y = sorted_plus_local_attention(to_blocks(q), sorted_k, sorted_v, k_BxNxSxHxD, v_BxNxSxHxD, sorted_real_BxHxNxS,
                                      real_BxNxS, causal=self.causal, dropout_rate=self.dropout_rate,
                                      dropout_rng=dropout_rng)
      y = y.reshape(b, n * bs, *y.shape[3:])
    return self.project_out(y[:, :length], features)
