"""Native Sparse Attention (Yuan et al., DeepSeek, ACL 2025): per query, three branches mixed by learned gates.

  o_t = g_cmp * Attn(q_t, compressed) + g_slc * Attn(q_t, selected) + g_win * Attn(q_t, window),  g = sigmoid(W x_t)

- compressed: the keys (values) cut into blocks of `compress_block` (l) tokens every `compress_stride` (d) tokens,
  each block (plus a learned intra-block position embedding) mapped to one token by an MLP (`phi`); a causal query
  sees a compressed token once the block's last token is in its past;
- selected: the sequence cut into blocks of `select_block` (l') tokens; a block's importance for query t is the
  compressed branch's attention probability of the compressed tokens covering it (each weighted by how many of its
  stride-d steps fall in the block: the paper's Eq. 9 for d | l and d | l'), summed over the query heads of a GQA
  group, so the group shares one selection (the paper's kernel loads each selected block once per group). The top
  `num_selected` (n) blocks are attended token by token, always including the first block and the
  `num_local_blocks` blocks ending at the query's own; ties go to the lower block index;
- window: the last `window` (w) tokens (bidirectional: |t - s| < w).
Selection is integer top-k inside the step, not differentiated (as in the paper): gradients reach the selector
through the compressed branch and the gates.

The paper's defaults: l=32, d=16, l'=64, n=16 (including 1 initial and 2 local blocks), w=512, GQA with 4 groups
(64 query heads in their 27B model), at 64K tokens. They are this layer's defaults too (`num_selected=None`: 16, or
every block when the sequence has fewer); scale them to shorter sequences by options (e.g. at 1K-4K:
`select_block=32, num_selected=8, window=128`; at 128 tokens: `compress_block=8, compress_stride=4,
select_block=16, num_selected=4, window=32`). `use_compressed`,
`use_selected`, `use_window` switch branches off for the paper's ablations (the compressed scores are still computed
when only selection uses them).

Causal (language modelling) and bidirectional (classification: every block selectable, the local blocks are the
query's own and the ones before it). Decoding keeps every key and value (the selected branch may pick any block), the
compressed tokens (one appended every d steps once a block of l is complete) and selects per step; stepping equals the
parallel causal output.

Implementation (`attention/adaptive_sparse.py`): the selected branch's default (`implementation=None`) is chosen by
the platform the step is lowered for. On CPU (and wherever no kernel backend lowers it) the key-block-major XLA form:
the selections turned into per-block lists of the queries that chose each block, built in the graph, each step one
key block against up to 128 query rows (its queries x the group's heads; every group's lists in one loop; work
O(L·n·l'), memory O(L·H·D)); unselected blocks are never touched, forward or backward. On tpu and cuda,
`kernels.flex`'s Pallas kernels with traced tile lists (per query tile, the key blocks any of its tokens selected;
the transposed lists for the backward built in the graph; each token's own selection applied inside the visited
tiles as bitmaps XLA evaluates: their static capacity follows the lists' width, at lengths below about 64K every key
tile, i.e. L x L elements in tile form; `kernels.flex.tables`). `"flex"` forces the flex path everywhere (flex's
XLA form on CPU: a query tile visits the union of its tokens' blocks), `"xla"` the block-major form, `"reference"`
the same selection as dense token masks (the tests' ground truth). The compressed and window branches are chunked
XLA forms on every platform, sharing one chunk loop (`adaptive_sparse.summary_and_window_attention`: one output and
one dQ buffer for both).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention import adaptive_sparse as core
from attention.base import AttentionLayer, default_kernel_init
from attention.registry import register
from attention.ranges import KV_HEADS_DIVIDE_HEADS, Constraint, Integer, OneOf, Satisfies
from kernels import sequence as sequence_lib


# Queries per chunk of nsa's compressed + window loop. Smaller than the other cores' 64: the window branch computes
# chunk + window - 1 keys per query (16: 3% over the 512 window, 64: 12%) and the compressed branch's products stay
# large. Measured on one core (fwd + bwd, causal, 8 / 2 heads, the paper's sizes; median of 3, two runs each):
# 8K 1.31 / 1.25 s at 16 against 1.32 / 1.35 at 64; 16K 3.15 / 3.24 against 3.84 / 3.46; 32K 9.19 / 9.16 against
# 10.20; compiled memory at 32K 494 MiB against 525. 8 was slower (1.36 / 1.37 s at 8K).
QUERY_CHUNK = 16


def coverage_matrix(num_compressed: int, num_blocks: int, *, compress_block: int, compress_stride: int,
                    select_block: int) -> np.ndarray:
  """`[Nc, Ns]` float32: how many of compressed token i's stride-d steps lie in selection block j (its overlap with
  the block, in tokens, over d): p_slc = p_cmp @ M, the paper's Eq. 9."""
  starts = np.arange(num_compressed)[:, None] * compress_stride
  b0 = np.arange(num_blocks)[None, :] * select_block
  overlap = np.clip(np.minimum(starts + compress_block, b0 + select_block) - np.maximum(starts, b0), 0, None)
  return (overlap / compress_stride).astype(np.float32)


def num_compressed_tokens(length: int, compress_block: int, compress_stride: int) -> int:
  return 0 if length < compress_block else (length - compress_block) // compress_stride + 1


def select_scores(block_scores_BxCxGxN: jax.Array, q_pos_C: jax.Array, first_real_BxN: jax.Array, *,
                  select_block: int, num_local_blocks: int, causal: bool, num_keys: int) -> jax.Array:
  """Block scores with the rules of the selection: blocks not yet reached (causal) or without a real key get -inf;
  the first block and the local blocks get +inf (always selected when allowed)."""
  blocks = jnp.arange(block_scores_BxCxGxN.shape[-1])
  own = (q_pos_C // select_block)[:, None]  # [C, 1]
  reach = q_pos_C[:, None] if causal else num_keys - 1
  allowed = first_real_BxN[:, None, :] <= reach  # [B, C, N]
  forced = (blocks[None, :] == 0) | ((blocks[None, :] <= own) & (blocks[None, :] > own - num_local_blocks))
  scores = jnp.where(forced[None, :, None], jnp.inf, block_scores_BxCxGxN)
  return jnp.where(allowed[:, :, None], scores, -jnp.inf)


def coverage_bands(coverage_NcxNs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per selection block, the compressed tokens overlapping it and their weights, `[Ns, K]` each (K the most any
  block has; padding weight 0). The coverage matrix is banded: a block overlaps about (l + l') / d compressed
  tokens, so a block's importance is a sum of K terms, not a row of an `[Nc, Ns]` matmul (the paper's sizes at 32K:
  K = 6 instead of 2,047 terms, a 340x smaller product per query)."""
  cov_T = np.asarray(coverage_NcxNs, np.float32).T  # [Ns, Nc]
  k = max(1, int((cov_T > 0).sum(axis=1).max(initial=0)))
  order = np.argsort(cov_T <= 0, axis=1, kind="stable")[:, :k]  # each block's overlapping tokens first, in order
  if order.shape[1] < k:  # no compressed token at all (a sequence shorter than one compressed block)
    return np.zeros((cov_T.shape[0], k), np.int32), np.zeros((cov_T.shape[0], k), np.float32)
  return order.astype(np.int32), np.take_along_axis(cov_T, order, axis=1)


def select_blocks(probs_BxGxgxCxNc: jax.Array, q_pos_C: jax.Array, *, coverage_NcxNs: np.ndarray,
                  first_real_BxNs: jax.Array, select_block: int, num_local_blocks: int, num_selected: int,
                  causal: bool, num_keys: int) -> jax.Array:
  """The selected blocks `[B, C, Hkv, n]` (-1 = none) from the compressed branch's probabilities: importance summed
  over the query heads of each group, spread onto selection blocks (`coverage_matrix`, a concrete host array, summed
  by its bands: `coverage_bands`), the rules of `select_scores`, top-n with ties to the lower block."""
  idx_NsxK, w_NsxK = coverage_bands(coverage_NcxNs)
  p_BxGxCxNc = jnp.sum(probs_BxGxgxCxNc, axis=2)
  if p_BxGxCxNc.shape[-1] == 0:
    importance = jnp.zeros(p_BxGxCxNc.shape[:-1] + (idx_NsxK.shape[0],), jnp.float32).transpose(0, 2, 1, 3)
  else:
    importance = jnp.einsum("bxcmk,mk->bcxm", p_BxGxCxNc[..., idx_NsxK], w_NsxK)
  scores = select_scores(importance, q_pos_C, first_real_BxNs, select_block=select_block,
                         num_local_blocks=num_local_blocks, causal=causal, num_keys=num_keys)
  return core.top_blocks(scores, num_selected)


def nsa_attention(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, kc_BxNxGxD, vc_BxNxGxD, valid_c_BxN, real_BxS, gates_BxLxHx3, *,
                  compress_block: int, compress_stride: int, select_block: int, num_selected: int,
                  num_local_blocks: int, window: int, use_compressed: bool = True, use_selected: bool = True,
                  use_window: bool = True, causal: bool, q_offset=0, dropout_rate: float = 0.0,
                  dropout_rng: jax.Array | None = None, query_chunk: int = QUERY_CHUNK,
                  implementation: str = "xla") -> tuple[jax.Array, jax.Array]:
  """NSA's core on projected, padded keys (`S` a multiple of `select_block`) and their compressed tokens: the gated
  sum of the branches (float32 `[B, L, H, D]`) and the selected blocks `[B, L, Hkv, n]`."""
  b, l, h, dim = q_BxLxHxD.shape
  s = k_BxSxGxD.shape[1]
  scale = dim ** -0.5
  nc, ns = kc_BxNxGxD.shape[1], s // select_block
  k_pos_c = np.arange(nc, dtype=np.int32) * compress_stride + compress_block - 1  # host: causal segments
  coverage = coverage_matrix(nc, ns, compress_block=compress_block, compress_stride=compress_stride,
                             select_block=select_block)
  first_real = core.first_real_position(real_BxS, b, s, select_block)

  def block_choice(probs_BxGxgxCxNc, q_pos_C):
    return select_blocks(probs_BxGxgxCxNc, q_pos_C, coverage_NcxNs=coverage, first_real_BxNs=first_real,
                         select_block=select_block, num_local_blocks=num_local_blocks, num_selected=num_selected,
                         causal=causal, num_keys=s)

  dense = "reference" if implementation == "reference" else "xla"  # the branches flex does not serve
  kw = dict(scale=scale, q_offset=q_offset, dropout_rate=dropout_rate, query_chunk=query_chunk)
  summary = dict(k=kc_BxNxGxD, v=vc_BxNxGxD, k_pos_S=k_pos_c, key_valid_BxS=valid_c_BxN,
                 dropout_seed=core.branch_seed(dropout_rng, 0))
  local = dict(k=k_BxSxGxD, v=v_BxSxGxD, window=window, key_mask_BxS=real_BxS,
               dropout_seed=core.branch_seed(dropout_rng, 2))
  if use_window and dense == "xla":  # the compressed and window branches share one chunk loop (one output, one dQ)
    w_cmp = gates_BxLxHx3[..., 0] if use_compressed else jnp.zeros(gates_BxLxHx3.shape[:3], jnp.float32)
    out, block_idx = core.summary_and_window_attention(
        q_BxLxHxD, jnp.stack([w_cmp, gates_BxLxHx3[..., 2]], axis=-1), summary, local, causal=causal,
        probs_fn=block_choice, **kw)
  else:
    o_cmp, block_idx = core.summary_attention(
        q_BxLxHxD, summary["k"], summary["v"], k_pos_S=k_pos_c, key_valid_BxS=valid_c_BxN, causal=causal,
        dropout_seed=summary["dropout_seed"], probs_fn=block_choice, implementation=dense, **kw)
    out = gates_BxLxHx3[..., 0:1] * o_cmp if use_compressed else jnp.zeros((b, l, h, dim), jnp.float32)
    if use_window:
      out = out + gates_BxLxHx3[..., 2:3] * core.window_attention(
          q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, window=window, causal=causal, key_mask_BxS=real_BxS,
          dropout_seed=local["dropout_seed"], implementation=dense, **kw)
  if use_selected:
    o_slc = core.selected_attention(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, block_idx, block_size=select_block,
                                    causal=causal, key_mask_BxS=real_BxS,
                                    dropout_rng=core.branch_rng(dropout_rng, 1), implementation=implementation, **kw)
    out = out + gates_BxLxHx3[..., 1:2] * o_slc
  return out, block_idx


PAPER_NUM_SELECTED = 16
_TRUE = Satisfies(lambda v: v is True, "True")


def _multiple_of_stride(compress_stride: int) -> Integer:
  return Integer(1, multiple_of=compress_stride)


@register("nsa")
class NativeSparseAttention(AttentionLayer):
  """Attributes (paper defaults; see the module docstring): compress_block (l=32), compress_stride (d=16),
  select_block (l'=64), num_selected (n; None = 16, or every block of a shorter sequence), num_local_blocks (2), window (w=512), num_kv_heads (None = num_heads;
  a divisor of num_heads), use_compressed / use_selected / use_window (ablations), query_chunk (16; queries per chunk
  of the compressed and window branches' XLA forms: memory, not values), implementation (None: flex's kernels on
  tpu/cuda, the block-major XLA form elsewhere; "flex", "xla", "reference": see the module docstring)."""

  compress_block: int = 32
  compress_stride: int = 16
  select_block: int = 64
  num_selected: int | None = None
  num_local_blocks: int = 2
  window: int = 512
  num_kv_heads: int | None = None
  use_compressed: bool = True
  use_selected: bool = True
  use_window: bool = True
  query_chunk: int = QUERY_CHUNK
  implementation: str | None = None
  option_ranges = {"implementation": OneOf(core.IMPLEMENTATIONS, what="nsa implementation"),
                   "compress_block": Integer(1), "compress_stride": Integer(1), "select_block": Integer(1),
                   "num_selected": Integer(1, allow_none=True), "num_local_blocks": Integer(0), "window": Integer(1),
                   "num_kv_heads": Integer(1, allow_none=True), "query_chunk": Integer(1)}

  supports_decode = True

  # Between the options (the paper: l=32, d=16, l'=64): checked by the gate before any tracing (attention/gate.py,
  # and num_kv_heads against the model's num_heads when the layer is built), not by the layer at every call.
  option_constraints = (
      Constraint("compress_block", ("compress_stride",), _multiple_of_stride,
                 why="compressed tokens start every compress_stride tokens; e.g. l=32, d=16"),
      Constraint("select_block", ("compress_stride",), _multiple_of_stride,
                 why="selection blocks are scored from the compressed tokens; e.g. l'=64, d=16"),
      Constraint("compress_block", ("select_block",), lambda select_block: Integer(1, select_block),
                 why="the paper: l=32 <= l'=64"),
      Constraint("window", ("select_block",), lambda select_block: Integer(select_block),
                 why="a window shorter than a selection block; use window >= select_block"),
      Constraint("num_selected", ("num_local_blocks",), lambda num_local_blocks: Integer(1 + num_local_blocks),
                 why="the selected blocks hold the first block and the num_local_blocks local ones"),
      Constraint("use_window", ("use_compressed", "use_selected"),
                 lambda use_compressed, use_selected: None if use_compressed or use_selected else _TRUE,
                 why="every other branch is switched off; keep one"),
      KV_HEADS_DIVIDE_HEADS,  # the one grouped-query constraint (flex, softmax, nsa)
  )

  def _check_options(self, length: int) -> None:
    """What only the call knows: the selected blocks against the blocks of this sequence."""
    ls = self.select_block
    blocks = -(-length // ls)
    if self.num_selected is not None and self.num_selected > blocks:
      raise ValueError(f"nsa: num_selected={self.num_selected} is larger than the {blocks} blocks of "
                       f"select_block={ls} in a sequence of {length}; use num_selected <= {blocks}")

  def selected_count(self, blocks: int) -> int:
    """n: the option, or (None) the paper's 16 capped at the sequence's blocks."""
    return self.num_selected if self.num_selected is not None else min(PAPER_NUM_SELECTED, blocks)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def _compress(self, blocks_BxNxLxGxD: jax.Array, which: str) -> jax.Array:
    """phi: a block of l keys (values) plus intra-block positions -> one token, per KV head, shared weights."""
    l, dim = blocks_BxNxLxGxD.shape[2], blocks_BxNxLxGxD.shape[-1]
    pos = self.param(f"compress_{which}_position", nn.initializers.normal(0.02), (l, dim), jnp.float32)
    x = blocks_BxNxLxGxD + pos[:, None, :].astype(blocks_BxNxLxGxD.dtype)
    b, n, _, g, _ = x.shape
    x = x.transpose(0, 1, 3, 2, 4).reshape(b, n, g, l * dim)
    hidden = self.dense(dim, f"compress_{which}_hidden", kernel_init=default_kernel_init)(x)
    return self.dense(dim, f"compress_{which}_out", kernel_init=default_kernel_init)(nn.gelu(hidden))

  def _compressed_tokens(self, k_BxSxGxD: jax.Array, starts_N: jax.Array, which: str) -> jax.Array:
    idx = starts_N[:, None] + jnp.arange(self.compress_block)[None, :]  # [N, l]
    return self._compress(k_BxSxGxD[:, idx], which)

  def _branches(self, q, k, v, kc, vc, valid_c, real_BxS, gates_BxLxHx3, q_offset, seed, *, causal: bool):
    """The three branches on (possibly cached) keys: float32 `[B, L, H, D]`."""
    out, block_idx = nsa_attention(
        q, k, v, kc, vc, valid_c, real_BxS, gates_BxLxHx3, compress_block=self.compress_block,
        compress_stride=self.compress_stride, select_block=self.select_block,
        num_selected=self.selected_count(k.shape[1] // self.select_block),
        num_local_blocks=self.num_local_blocks, window=self.window, use_compressed=self.use_compressed,
        use_selected=self.use_selected, use_window=self.use_window, causal=causal, q_offset=q_offset,
        dropout_rate=self.dropout_rate if seed is not None else 0.0, dropout_rng=seed,
        query_chunk=self.query_chunk, implementation=self.implementation)
    self.sow("intermediates", "block_idx", block_idx)
    return out

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    b, length, features = x.shape
    dim = self.head_dim(x)
    q = self.project(x, "query")
    kv = lambda name: sequence_lib.fallback_gather(  # noqa: E731  (no sequence-parallel form: the exact fallback)
        self.dense((self.kv_heads, dim), name, axis=-1, kernel_init=default_kernel_init)(x), "nsa")
    k, v = kv("key"), kv("value")
    gates = nn.sigmoid(self.dense((self.num_heads, 3), "gate", axis=-1)(x).astype(jnp.float32))
    step_real = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
    # Padded keys are zeroed before compression, so a compressed token never carries padded content.
    k = k * step_real[..., None, None].astype(k.dtype)
    v = v * step_real[..., None, None].astype(v.dtype)
    drop = self.dropout_rng(deterministic)
    seed = drop  # a key: each branch folds in its own
    l, d = self.compress_block, self.compress_stride

    if self.decode and self.has_variable("cache", "index"):
      return self._decode_step(x, q, k, v, step_real, gates, seed)

    padded = length + (-length % self.select_block)
    self._check_options(padded)
    k_p, v_p = core.pad_length(k, self.select_block), core.pad_length(v, self.select_block)
    real = core.pad_length(step_real, self.select_block, value=False)
    nc = num_compressed_tokens(padded, l, d)
    starts = jnp.arange(nc) * d
    kc, vc = self._compressed_tokens(k_p, starts, "key"), self._compressed_tokens(v_p, starts, "value")
    valid_c = jnp.any(real[:, starts[:, None] + jnp.arange(l)], axis=-1)
    if self.decode:  # init: allocate the cache for this (maximum) length
      self._cache(k_p, v_p, real, kc, vc)
    out = self._branches(q, k_p, v_p, kc, vc, valid_c, real, gates, 0, seed, causal=self.causal)
    return self.project_out(out.astype(self.compute_dtype), features)

  def _cache(self, k, v, real, kc, vc):
    zeros = lambda t: (lambda: jnp.zeros(t.shape, t.dtype))  # noqa: E731
    return {"key": self.variable("cache", "cached_key", zeros(k)),
            "value": self.variable("cache", "cached_value", zeros(v)),
            "real": self.variable("cache", "real", zeros(real)),
            "compressed_key": self.variable("cache", "compressed_key", zeros(kc)),
            "compressed_value": self.variable("cache", "compressed_value", zeros(vc)),
            "index": self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))}

  def _decode_step(self, x, q, k, v, step_real, gates, seed):
    if x.shape[1] != 1:
      raise ValueError(f"nsa: a decode step takes one position per call, got length {x.shape[1]}")
    cache = self._cache(k, k, step_real, k, k)  # shapes come from the allocated variables
    t = cache["index"].value
    self._check_options(cache["key"].value.shape[1])
    put = lambda buf, new, at: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), at, axis=1)  # noqa
    cache["key"].value = put(cache["key"].value, k, t)
    cache["value"].value = put(cache["value"].value, v, t)
    cache["real"].value = put(cache["real"].value, step_real, t)
    l, d = self.compress_block, self.compress_stride
    # A compressed token is appended when the step completes a block of l keys (every d steps after the first l).
    completes = (t + 1 >= l) & ((t + 1 - l) % d == 0)
    i = jnp.maximum(t + 1 - l, 0) // d
    for name, raw in (("key", cache["key"]), ("value", cache["value"])):
      block = jax.lax.dynamic_slice_in_dim(raw.value, i * d, l, axis=1)
      token = self._compress(block[:, None], name)  # [B, 1, Hkv, D]
      buf = cache[f"compressed_{name}"]
      buf.value = jnp.where(completes, put(buf.value, token, jnp.minimum(i, buf.value.shape[1] - 1)), buf.value)
    cache["index"].value = t + 1
    real = cache["real"].value
    nc = cache["compressed_key"].value.shape[1]
    starts = jnp.arange(nc) * d
    valid_c = jnp.any(real[:, starts[:, None] + jnp.arange(l)], axis=-1)
    out = self._branches(q, cache["key"].value, cache["value"].value, cache["compressed_key"].value,
                         cache["compressed_value"].value, valid_c, real, gates, t, seed, causal=True)
    return self.project_out(out.astype(self.compute_dtype), x.shape[-1])


__all__ = ["NativeSparseAttention", "coverage_bands", "coverage_matrix", "nsa_attention", "num_compressed_tokens",
           "select_blocks", "select_scores"]
