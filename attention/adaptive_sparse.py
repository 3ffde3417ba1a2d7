"""Cores shared by the content-adaptive sparse variants (nsa, moba, routing, compressed): attention of every query
token over key blocks chosen per token, over a sliding window, or over a short list of summary keys.

Tensors are `[batch, length, heads, head_dim]`; keys and values may have fewer heads than queries (grouped-query
attention: query head `h` reads key/value head `h // (H // Hkv)`). Every core has two forms with the same values and
gradients:
  - a dense reference (`masked_attention_reference`) given the token mask the selection stands for, the ground
    truth of the tests;
  - an XLA form that never touches a key outside the selection: the window and summary cores take queries in chunks
    of `query_chunk` tokens (a `lax.map` whose body is rematerialized, so the backward recomputes each chunk from its
    inputs and memory stays O(chunk x keys of the chunk)); the selected core walks key blocks, each with the queries
    that chose it (`selected_attention`).
Selections (block indices) are integers computed inside the jitted step: not differentiated, as in the papers.

Attention dropout is the project's counter hash (`kernels.common.dropout_keep`) keyed by (batch * heads + head,
query position, key position) and a per-branch seed, so the gathered forms and the reference draw the same mask.
A query with no allowed key outputs 0 (finite gradients).

Positions: query `i` sits at `q_offset + i` (a traced scalar in decoding); keys carry explicit positions where they
summarize a span (a compressed token, a pooled block): such a key is visible to a causal query once the last token of
its span is.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import MASK_VALUE, dropout_keep, dropout_seed as seed_of

DEFAULT_QUERY_CHUNK = 64
DEFAULT_Q_TILE = 64  # query tile of the flex form
# The selected branch's forms: None (default) flex's kernels where the program is lowered for tpu or cuda, the "xla"
# form elsewhere; "flex": kernels.flex with traced tile lists on every platform (its XLA form on CPU); "xla": the
# key-block-major gathered form; "reference": the dense token-mask form (the tests' ground truth).
IMPLEMENTATIONS = (None, "flex", "xla", "reference")


def branch_rng(rng: jax.Array | None, branch: int) -> jax.Array | None:
  """A distinct dropout key per branch of a layer (so two branches' masks are not the same hash)."""
  return None if rng is None else jax.random.fold_in(rng, branch)


def branch_seed(rng: jax.Array | None, branch: int) -> jax.Array | None:
  """The int32 hash seed of `branch_rng(rng, branch)`."""
  return None if rng is None else seed_of(branch_rng(rng, branch))


def _softmax_rows(scores: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Softmax over the last axis restricted to `allowed`; rows with nothing allowed give 0. Returns (weights, lse)."""
  scores = jnp.where(allowed, scores, MASK_VALUE)
  m = jnp.max(scores, axis=-1, keepdims=True)
  e = jnp.where(allowed, jnp.exp(scores - m), 0.0)
  s = jnp.sum(e, axis=-1, keepdims=True)
  weights = e / jnp.where(s > 0, s, 1.0)
  lse = jnp.where(s[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(s > 0, s, 1.0))[..., 0], -jnp.inf)
  return weights, lse


def _keep_multiplier(seed: jax.Array | None, rate: float, bh: jax.Array, q_pos: jax.Array,
                     k_pos: jax.Array) -> jax.Array | None:
  """Inverted-dropout multipliers (0 or 1 / (1 - rate)) of the shared counter hash, or None without dropout."""
  if seed is None or rate == 0.0:
    return None
  return jnp.where(dropout_keep(seed, bh, q_pos, k_pos, rate), jnp.float32(1.0 / (1.0 - rate)), jnp.float32(0.0))


def _dropout(weights: jax.Array, seed: jax.Array | None, rate: float, bh: jax.Array, q_pos: jax.Array,
             k_pos: jax.Array) -> jax.Array:
  keep = _keep_multiplier(seed, rate, bh, q_pos, k_pos)
  return weights if keep is None else weights * keep


@jax.custom_vjp
def _rows_attend(q_BxCxXxGxD, k_BxSxXxD, v_BxSxXxD, allowed, keep, scale):
  """Dense attention of a chunk's grouped queries over a short key list, float32: `(out [B, C, Hkv, G, D], probs
  [B, Hkv, G, C, S])`, `allowed` broadcasting to the probabilities, `keep` the dropout multipliers (or None). The
  backward reuses the forward's probabilities and takes the softmax term `rowsum(P ∘ dP)` as one fused reduction
  (autodiff's form of the normalization ran at ~2.4 ms per 64-query chunk on XLA:CPU); the output is not a
  residual, so where a chunk loop rematerializes its body the recomputed forward skips `P·V` (nsa's compressed +
  window loop 6-9% faster at 16K than with `rowsum(dO ∘ O)`, one core). `probs` (the undropped probabilities, NSA's
  block scores) carry no gradient: callers stop it."""
  return _rows_attend_fwd(q_BxCxXxGxD, k_BxSxXxD, v_BxSxXxD, allowed, keep, scale)[0]


def _rows_attend_fwd(q, k, v, allowed, keep, scale):
  scores = jnp.einsum("bcxgd,bsxd->bxgcs", q, k) * scale
  probs, _ = _softmax_rows(scores, allowed)
  weights = probs if keep is None else probs * keep
  out = jnp.einsum("bxgcs,bsxd->bcxgd", weights, v)
  return (out, probs), (q, k, v, keep, scale, probs, weights)


def _rows_attend_bwd(res, cts):
  q, k, v, keep, scale, probs, weights = res
  d_out = cts[0]
  dv = jnp.einsum("bxgcs,bcxgd->bsxd", weights, d_out)
  dp = jnp.einsum("bcxgd,bsxd->bxgcs", d_out, v)
  if keep is not None:
    dp = dp * keep
  ds = probs * (dp - jnp.sum(probs * dp, axis=-1, keepdims=True)) * scale
  dq = jnp.einsum("bxgcs,bsxd->bcxgd", ds, k)
  dk = jnp.einsum("bxgcs,bcxgd->bsxd", ds, q)
  return dq, dk, dv, None, None, None


_rows_attend.defvjp(_rows_attend_fwd, _rows_attend_bwd)


def _group(q_BxLxHxD: jax.Array, num_kv_heads: int) -> jax.Array:
  b, l, h, d = q_BxLxHxD.shape
  if h % num_kv_heads:
    raise ValueError(f"query heads {h} must be a multiple of key/value heads {num_kv_heads}")
  return q_BxLxHxD.reshape(b, l, num_kv_heads, h // num_kv_heads, d)


def _batch_head(batch: int, hkv: int, g: int) -> jax.Array:
  """`[B, Hkv, G]` int32: batch * heads + head of every grouped query head (the dropout counter)."""
  return (jnp.arange(batch)[:, None, None] * (hkv * g) + jnp.arange(hkv)[None, :, None] * g
          + jnp.arange(g)[None, None, :]).astype(jnp.int32)


# ---- the dense reference -----------------------------------------------------------------------------------------

def masked_attention_reference(q_BxLxHxD: jax.Array, k_BxSxGxD: jax.Array, v_BxSxGxD: jax.Array,
                               allowed_BxGxLxS: jax.Array, *, scale: float, q_pos_L: jax.Array | None = None,
                               k_pos_S: jax.Array | None = None, dropout_rate: float = 0.0,
                               dropout_seed: jax.Array | None = None, return_lse: bool = False):
  """Dense softmax attention over the keys `allowed` marks (bool, broadcastable to `[B, Hkv, L, S]`, shared by the
  query heads of a group). Float32 output `[B, L, H, D]` (and `[B, L, H]` log-sum-exp with `return_lse`)."""
  b, l, h, d = q_BxLxHxD.shape
  hkv = k_BxSxGxD.shape[2]
  q = _group(q_BxLxHxD, hkv).astype(jnp.float32)
  q_pos = jnp.arange(l) if q_pos_L is None else q_pos_L
  k_pos = jnp.arange(k_BxSxGxD.shape[1]) if k_pos_S is None else k_pos_S
  scores = jnp.einsum("blxgd,bsxd->bxgls", q, k_BxSxGxD.astype(jnp.float32)) * scale
  weights, lse = _softmax_rows(scores, jnp.broadcast_to(allowed_BxGxLxS, (b, hkv, l, k_pos.shape[0]))[:, :, None])
  bh = _batch_head(b, hkv, h // hkv)[..., None, None]
  weights = _dropout(weights, dropout_seed, dropout_rate, bh, q_pos[:, None], k_pos[None, :])
  out = jnp.einsum("bxgls,bsxd->blxgd", weights, v_BxSxGxD.astype(jnp.float32)).reshape(b, l, h, d)
  if return_lse:
    return out, lse.transpose(0, 3, 1, 2).reshape(b, l, h)
  return out


def selection_mask(block_idx_BxGxLxN: jax.Array, *, block_size: int, num_keys: int, causal: bool,
                   q_pos_L: jax.Array, key_mask_BxS: jax.Array | None) -> jax.Array:
  """The token mask a per-token block selection stands for: `[B, Hkv, L, S]` (the reference's input)."""
  blocks = jnp.arange(num_keys) // block_size
  chosen = jnp.any((block_idx_BxGxLxN[..., None] == blocks) & (block_idx_BxGxLxN[..., None] >= 0), axis=-2)
  if causal:
    chosen = chosen & (jnp.arange(num_keys)[None, :] <= q_pos_L[:, None])
  if key_mask_BxS is not None:
    chosen = chosen & key_mask_BxS[:, None, None, :]
  return chosen


# ---- chunked driver ------------------------------------------------------------------------------------------------

def _chunked(fn: Callable, q_BxLxHxD: jax.Array, chunk: int, q_offset, extras: tuple = ()) -> tuple:
  """Runs `fn(q_chunk, q_pos_C, *extra_chunks)` over query chunks (a rematerialized lax.map over chunk indices, each
  slicing its queries and the per-query `extras` `[B, L, ...]`: no stacked copy is saved for the backward) and joins
  the results along the length axis (axis 1 of every output)."""
  b, l = q_BxLxHxD.shape[:2]
  c = max(1, min(chunk, l))
  pad = -l % c
  n = (l + pad) // c
  padded = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x  # noqa: E731
  q, extras = padded(q_BxLxHxD), tuple(padded(x) for x in extras)

  @jax.checkpoint
  def body(i):
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)  # noqa: E731
    return fn(cut(q), q_offset + i * c + jnp.arange(c), *map(cut, extras))

  outs = jax.lax.map(body, jnp.arange(n))
  return tuple(jnp.moveaxis(o, 0, 1).reshape(b, n * c, *o.shape[3:])[:, :l] for o in outs)


def selected_attention(q_BxLxHxD: jax.Array, k_BxSxGxD: jax.Array, v_BxSxGxD: jax.Array,
                       block_idx_BxLxGxN: jax.Array, *, block_size: int, causal: bool,
                       key_mask_BxS: jax.Array | None, scale: float, q_offset=0, dropout_rate: float = 0.0,
                       dropout_rng: jax.Array | None = None, query_chunk: int = DEFAULT_QUERY_CHUNK,
                       implementation: str | None = None, q_tile: int = DEFAULT_Q_TILE) -> jax.Array:
  """Each query token attends to the key blocks it selected (`block_idx` `[B, L, Hkv or H, N]`, -1 = none: one
  selection shared by each GQA group, or one per query head reading its group's keys), with token-level causality and
  key padding. `S` must be a multiple of `block_size`. Float32 `[B, L, H, D]`.

  The "xla" form is key-block major (MoBA's and NSA's own kernels' order): the selections are turned in the graph
  into the transposed lists, per key block the queries that chose it (`block_entries`), and each step attends one key
  block to up to `entries_per_step` of its queries (gathered rows), merging into the queries' running softmax
  statistics; a custom VJP walks the same steps (dK, dV of the step's block, dQ scattered to its rows). Every
  (batch, selection head) group's lists are one list of virtual blocks, so a single loop runs exactly the steps in
  use, on the tensors in their own layout (queries as rows `[B·L·Hs, H/Hs, D]`, no transposed copies). Every key
  block is loaded once per step of its list, never for a query that did not choose it; work O(L·N·block_size), memory
  O(L·H·D + L·N). `implementation=None` runs it on CPU (and wherever no kernel backend lowers the program) and
  flex's kernels with traced tile lists on tpu and cuda (`_selected_flex`)."""
  b, l, h, d = q_BxLxHxD.shape
  s, hkv = k_BxSxGxD.shape[1], k_BxSxGxD.shape[2]
  if s % block_size:
    raise ValueError(f"selected_attention: keys={s} must be a multiple of block_size={block_size}")
  nb = s // block_size
  if block_idx_BxLxGxN.shape[2] not in (hkv, h):
    raise ValueError(f"selected_attention: block_idx has {block_idx_BxLxGxN.shape[2]} heads; expected the {hkv} "
                     f"key/value heads (one selection per group) or the {h} query heads (one per head)")
  if implementation is None:  # flex's kernels where a kernel backend lowers the program, else the XLA form below
    from kernels import platform  # pylint: disable=import-outside-toplevel

    def form(name):
      return lambda: selected_attention(
          q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, block_idx_BxLxGxN, block_size=block_size, causal=causal,
          key_mask_BxS=key_mask_BxS, scale=scale, q_offset=q_offset, dropout_rate=dropout_rate,
          dropout_rng=dropout_rng, query_chunk=query_chunk, implementation=name, q_tile=q_tile)

    return platform.dispatch("adaptive_sparse.selected_attention", xla=form("xla"),
                             kernels={"gpu": form("flex"), "tpu": form("flex")})
  if implementation == "flex":
    return _selected_flex(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, block_idx_BxLxGxN, block_size=block_size, causal=causal,
                          key_mask_BxS=key_mask_BxS, scale=scale, q_offset=q_offset, dropout_rate=dropout_rate,
                          dropout_rng=dropout_rng, q_tile=q_tile)
  dropout_seed = None if dropout_rng is None or dropout_rate == 0.0 else seed_of(dropout_rng)
  if implementation == "reference":
    q_pos = q_offset + jnp.arange(l)
    allowed = selection_mask(block_idx_BxLxGxN.transpose(0, 2, 1, 3), block_size=block_size, num_keys=s,
                             causal=causal, q_pos_L=q_pos, key_mask_BxS=key_mask_BxS)
    return masked_attention_reference(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, allowed, scale=scale, q_pos_L=q_pos,
                                      dropout_rate=dropout_rate, dropout_seed=dropout_seed)
  rate = dropout_rate if dropout_seed is not None else 0.0
  # Selections per key/value head: one shared by its G query heads (NSA), or one per query head (MoBA) reading the
  # shared key/value head (no repeated keys). Every (batch, selection head) is one group; the queries are rows
  # `[B·L·Hs, gs, D]` (a free reshape) and the groups' key blocks one list of "virtual blocks" (group·Nb + block),
  # so one loop walks every group's steps in the tensors' own layout: no transposed copies, no vmap padding every
  # group to the longest one's steps.
  hs = block_idx_BxLxGxN.shape[2]
  gs = h // hs  # query heads sharing one selection
  chunk = entries_per_step(gs, block_size)
  groups = (jnp.arange(b)[:, None, None, None] * hs + jnp.arange(hs)[None, None, :, None]) * nb
  virtual = jnp.where(block_idx_BxLxGxN >= 0, groups + block_idx_BxLxGxN, -1).reshape(b * l * hs, -1)
  slot_q, step_blk, steps = block_entries(virtual, b * hs * nb, chunk)
  spec = _BlockSpec(block_size, chunk, causal, float(scale), float(rate), l, hs, hkv, nb)
  q_offset = jnp.asarray(q_offset, jnp.int32)
  seed = jnp.asarray(0 if dropout_seed is None else dropout_seed, jnp.int32)
  real = jnp.ones((b, s), bool) if key_mask_BxS is None else key_mask_BxS.astype(bool)
  out = _blocks_attend(spec, q_BxLxHxD.reshape(b * l * hs, gs, d), k_BxSxGxD, v_BxSxGxD, real, q_offset, seed,
                       slot_q, step_blk, steps)
  return out.reshape(b, l, h, d)


# ---- the selected branch, key-block major ---------------------------------------------------------------------------

# Query rows (entries x group heads) per step of the block-major form: up to ROWS_PER_STEP, fewer where the block is
# long, so a step's scores stay within STEP_SCORES elements (measured on this CPU at 16K, one core: MoBA's 512-key
# blocks ran 20% faster in 64-row steps than in 128-row ones; NSA's 64-key blocks fastest at 128 rows).
ROWS_PER_STEP = 128
STEP_SCORES = 64 * 512


def entries_per_step(group: int, block_size: int) -> int:
  """Selections handled per step of `selected_attention`'s XLA form: about `min(ROWS_PER_STEP, STEP_SCORES /
  block_size)` query rows, at least one selection."""
  rows = max(1, min(ROWS_PER_STEP, STEP_SCORES // block_size))
  return max(1, rows // group)


def block_entries(block_idx_LxN: jax.Array, num_blocks: int, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One group's selections as block-major work (the transposed lists): every (query t, selected block j) pair,
  ordered by block then query, each block's run padded to whole steps of `chunk` pairs. Returns the query of every
  slot `[P]` (`L` = padding), the block of every step `[P // chunk]` and the number of steps in use (traced).
  `P = ceil((L·N + Nb·(chunk - 1)) / chunk)·chunk`: a static bound, O(L·N)."""
  l, n = block_idx_LxN.shape
  capacity = -(-(l * n + num_blocks * (chunk - 1)) // chunk) * chunk
  blk = block_idx_LxN.reshape(-1)
  valid = blk >= 0
  key = jnp.where(valid, blk, num_blocks)
  order = jnp.argsort(key, stable=True)  # pairs are in query order already: (block, query) order
  blk_sorted, t_sorted = key[order], (order // n).astype(jnp.int32)
  count = jnp.zeros((num_blocks + 1,), jnp.int32).at[key].add(1)[:num_blocks]
  start = jnp.cumsum(count) - count
  padded = -(-count // chunk) * chunk
  pstart = jnp.cumsum(padded) - padded
  j = jnp.minimum(blk_sorted, num_blocks - 1)
  rank = jnp.arange(l * n) - start[j]
  slot = jnp.where(blk_sorted < num_blocks, pstart[j] + rank, capacity)  # padding pairs are dropped
  slot_q = jnp.full((capacity,), l, jnp.int32).at[slot].set(t_sorted, mode="drop")
  step_blk = jnp.zeros((capacity // chunk,), jnp.int32).at[slot // chunk].set(j, mode="drop")
  return slot_q, step_blk, (jnp.sum(padded) // chunk).astype(jnp.int32)


class _BlockSpec(NamedTuple):
  """Static facts of a block-major call: tile and softmax settings, and the row layout (rows `(b·L + t)·Hs + xs`,
  selection head xs reading key/value head `xs // (Hs // Hkv)`; virtual block `(b·Hs + xs)·Nb + j`)."""
  block_size: int
  chunk: int
  causal: bool
  scale: float
  rate: float
  length: int
  sel_heads: int
  kv_heads: int
  num_blocks: int


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocks_attend(spec, q_RxGxD, k_BxSxXxD, v_BxSxXxD, real_BxS, q_offset, seed, slot_q, step_blk, steps):
  return _blocks_forward(spec, q_RxGxD, k_BxSxXxD, v_BxSxXxD, real_BxS, q_offset, seed, slot_q, step_blk, steps)[0]


def _blocks_step(spec, s, q_RxGxD, k_BxSxXxD, v_BxSxXxD, real_BxS, q_offset, seed, slot_q, step_blk):
  """Step `s`: its group's key block `[bs, D]`, its slots' query rows `[C, gs, D]`, scores `[C, gs, bs]` and mask. A
  padding slot (row R) reads row R - 1 (gathers clamp), is masked, and its row updates are dropped (`mode="drop"`)."""
  rows, gs = q_RxGxD.shape[:2]
  bs, l, hs = spec.block_size, spec.length, spec.sel_heads
  tq = jax.lax.dynamic_slice_in_dim(slot_q, s * spec.chunk, spec.chunk)
  vb = step_blk[s]
  group, j = vb // spec.num_blocks, vb % spec.num_blocks
  bb, xs = group // hs, group % hs
  x = xs // (hs // spec.kv_heads)
  at = (bb, j * bs, x, 0)
  size = (1, bs, 1, k_BxSxXxD.shape[-1])
  k_j = jax.lax.dynamic_slice(k_BxSxXxD, at, size)[0, :, 0]
  v_j = jax.lax.dynamic_slice(v_BxSxXxD, at, size)[0, :, 0]
  k_pos = j * bs + jnp.arange(bs)
  q_pos = q_offset + (tq // hs) % l
  allowed = (tq < rows)[:, None] & jax.lax.dynamic_slice(real_BxS, (bb, j * bs), (1, bs))
  if spec.causal:
    allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
  q_e = q_RxGxD[tq]
  scores = jnp.einsum("cgd,kd->cgk", q_e, k_j, preferred_element_type=jnp.float32) * spec.scale
  keep = None
  if spec.rate:
    bh = bb * (hs * gs) + xs * gs + jnp.arange(gs)  # batch * heads + query head
    keep = dropout_keep(seed, bh[None, :, None], q_pos[:, None, None], k_pos[None, None, :], spec.rate)
  return tq, q_e, k_j, v_j, scores, allowed[:, None, :], keep, at


def _blocks_forward(spec, q_RxGxD, k_BxSxXxD, v_BxSxXxD, real_BxS, q_offset, seed, slot_q, step_blk, steps):
  rate = spec.rate
  rows, g, d = q_RxGxD.shape

  def body(s, carry):
    m, lsum, acc = carry
    tq, _, _, v_j, scores, allowed, keep, _ = _blocks_step(spec, s, q_RxGxD, k_BxSxXxD, v_BxSxXxD, real_BxS,
                                                           q_offset, seed, slot_q, step_blk)
    scores = jnp.where(allowed, scores, MASK_VALUE)
    m_old, l_old, acc_old = m[tq], lsum[tq], acc[tq]
    m_new = jnp.maximum(m_old, jnp.max(scores, axis=-1))
    p = jnp.where(allowed, jnp.exp(scores - m_new[..., None]), 0.0)
    alpha = jnp.exp(m_old - m_new)
    pd = p if keep is None else jnp.where(keep, p / (1.0 - rate), 0.0)
    pv = jnp.einsum("cgk,kd->cgd", pd.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
    # A block lists a query once: the step's real slots are distinct rows; padding slots (row R) are dropped.
    return (m.at[tq].set(m_new, mode="drop"), lsum.at[tq].set(alpha * l_old + jnp.sum(p, axis=-1), mode="drop"),
            acc.at[tq].set(alpha[..., None] * acc_old + pv, mode="drop"))

  init = (jnp.full((rows, g), MASK_VALUE, jnp.float32), jnp.zeros((rows, g), jnp.float32),
          jnp.zeros((rows, g, d), jnp.float32))
  m, lsum, acc = jax.lax.fori_loop(0, steps, body, init)
  seen = lsum > 0
  safe = jnp.where(seen, lsum, 1.0)
  out = jnp.where(seen[..., None], acc / safe[..., None], 0.0)
  lse = jnp.where(seen, m + jnp.log(safe), 0.0)
  return out, lse


def _blocks_fwd(spec, q, k, v, real, q_offset, seed, slot_q, step_blk, steps):
  out, lse = _blocks_forward(spec, q, k, v, real, q_offset, seed, slot_q, step_blk, steps)
  return out, (q, k, v, real, q_offset, seed, slot_q, step_blk, steps, out, lse)


def _blocks_bwd(spec, res, do_RxGxD):
  q, k, v, real, q_offset, seed, slot_q, step_blk, steps, out, lse = res
  rate, scale = spec.rate, spec.scale
  delta = jnp.sum(do_RxGxD.astype(jnp.float32) * out, axis=-1)  # rowsum(dO ∘ O)

  def body(s, carry):
    dq, dk, dv = carry
    tq, q_e, k_j, v_j, scores, allowed, keep, at = _blocks_step(spec, s, q, k, v, real, q_offset, seed, slot_q,
                                                                 step_blk)
    p = jnp.where(allowed, jnp.exp(scores - lse[tq][..., None]), 0.0)
    do_e = do_RxGxD[tq].astype(jnp.float32)
    pd = p if keep is None else jnp.where(keep, p / (1.0 - rate), 0.0)
    dv_j = jnp.einsum("cgk,cgd->kd", pd, do_e)
    dp = jnp.einsum("cgd,kd->cgk", do_e, v_j.astype(jnp.float32))
    if keep is not None:
      dp = jnp.where(keep, dp / (1.0 - rate), 0.0)
    ds = p * (dp - delta[tq][..., None]) * scale
    dq = dq.at[tq].add(jnp.einsum("cgk,kd->cgd", ds, k_j.astype(jnp.float32)), mode="drop")
    dk_j = jnp.einsum("cgk,cgd->kd", ds, q_e.astype(jnp.float32))
    size = (1, spec.block_size, 1, k.shape[-1])
    add = lambda acc, upd: jax.lax.dynamic_update_slice(  # noqa: E731
        acc, jax.lax.dynamic_slice(acc, at, size) + upd[None, :, None], at)
    return dq, add(dk, dk_j), add(dv, dv_j)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq, dk, dv = jax.lax.fori_loop(0, steps, body, init)
  zeros = lambda x: None if x is None else jnp.zeros_like(x)  # noqa: E731  (integer inputs: no gradient)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros(real), zeros(q_offset), zeros(seed),
          zeros(slot_q), zeros(step_blk), zeros(steps))


_blocks_attend.defvjp(_blocks_fwd, _blocks_bwd)


def selection_bitmap(block_idx_BxLxGxN: jax.Array, num_blocks: int) -> jax.Array:
  """`[B, Hkv, L, Nb]` bool: token l of group x selected block j."""
  b, l, hkv, n = block_idx_BxLxGxN.shape
  idx = block_idx_BxLxGxN.transpose(0, 2, 1, 3)
  at = (jnp.arange(b)[:, None, None, None], jnp.arange(hkv)[None, :, None, None], jnp.arange(l)[None, None, :, None])
  grid = jnp.zeros((b, hkv, l, num_blocks + 1), bool)
  return grid.at[(*at, jnp.where(idx >= 0, idx, num_blocks))].set(True)[..., :num_blocks]


def _selected_flex(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, block_idx_BxLxGxN, *, block_size: int, causal: bool,
                   key_mask_BxS, scale: float, q_offset, dropout_rate: float, dropout_rng, q_tile: int,
                   flex_implementation: str | None = None) -> jax.Array:
  """The selected branch through `kernels.flex` with traced tile lists: per query tile of `q_tile` tokens, the key
  tiles (blocks) any of its tokens selected (`block_mask_from_indices`: the transposed lists for the backward are
  built in the graph; at most `q_tile x N` per query tile), and a mask function reading each token's own selection
  inside the visited tiles. Tiles no token of a query tile selected are never touched, forward or backward. flex's
  dispatch picks the implementation (`flex_implementation`, default None): its Pallas kernels on TPU and GPU where
  the tiles suit them (the mask closes over the traced selection, so XLA evaluates it on the visited partial tiles
  and the kernels read those tiles' bitmaps: 2 bytes x q_tile x block_size per listed tile), its XLA form on CPU."""
  from kernels import flex  # pylint: disable=import-outside-toplevel  (flex imports nothing of attention)

  b, l, h, d = q_BxLxHxD.shape
  s, hs = k_BxSxGxD.shape[1], block_idx_BxLxGxN.shape[2]  # hs: selections per position (Hkv, or H per head)
  g, nb = h // hs, s // block_size  # query heads per selection
  tile = max(1, min(q_tile, l))
  sel = selection_bitmap(block_idx_BxLxGxN, nb)  # [B, Hs, L, Nb]
  tq = -(-l // tile)
  padded = jnp.pad(sel, ((0, 0), (0, 0), (0, tq * tile - l), (0, 0)))
  union = jnp.any(padded.reshape(b, hs, tq, tile, nb), axis=3)  # [B, Hs, Tq, Nb]
  # Selected tiles first, in block order; a query tile's tokens select at most tile * N blocks (a static list bound,
  # which also bounds the kernels' partial-tile bitmaps).
  width = min(nb, tile * block_idx_BxLxGxN.shape[-1])
  order = jnp.argsort(~union, axis=-1, stable=True).astype(jnp.int32)[..., :width]
  count = jnp.sum(union, axis=-1).astype(jnp.int32)

  def mask_mod(bb, hh, q_idx, kv_idx):
    ok = sel[bb, hh // g, jnp.minimum(q_idx, l - 1), jnp.minimum(kv_idx // block_size, nb - 1)]
    return (ok & (kv_idx <= q_idx + q_offset)) if causal else ok

  bm = flex.block_mask_from_indices(order, count, q_len=l, kv_len=s, block_size=(tile, block_size),
                                    mask_mod=mask_mod)
  out = flex.flex_attention(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, mask_mod=mask_mod, block_mask=bm,
                            key_mask=key_mask_BxS, scale=scale, dropout_rate=dropout_rate if dropout_rng is not None
                            else 0.0, dropout_rng=dropout_rng, implementation=flex_implementation)
  return out.astype(jnp.float32)


def window_attention(q_BxLxHxD: jax.Array, k_BxSxGxD: jax.Array, v_BxSxGxD: jax.Array, *, window: int, causal: bool,
                     key_mask_BxS: jax.Array | None, scale: float, q_offset=0, dropout_rate: float = 0.0,
                     dropout_seed: jax.Array | None = None, query_chunk: int = DEFAULT_QUERY_CHUNK,
                     implementation: str = "xla") -> jax.Array:
  """Query t attends keys s with `t - window < s <= t` (causal) or `|t - s| < window`; each chunk slices only its
  band of keys. Float32 `[B, L, H, D]`."""
  l = q_BxLxHxD.shape[1]
  h, s = q_BxLxHxD.shape[2], k_BxSxGxD.shape[1]
  if implementation == "reference":
    q_pos = q_offset + jnp.arange(l)
    allowed = window_mask(l, s, window=window, causal=causal, q_pos_L=q_pos, key_mask_BxS=key_mask_BxS)
    return masked_attention_reference(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, allowed, scale=scale, q_pos_L=q_pos,
                                      dropout_rate=dropout_rate, dropout_seed=dropout_seed)
  return _chunked(_window_chunk(k_BxSxGxD, v_BxSxGxD, h, window=window, causal=causal, key_mask_BxS=key_mask_BxS,
                                scale=scale, dropout_rate=dropout_rate, dropout_seed=dropout_seed,
                                chunk=max(1, min(query_chunk, l))), q_BxLxHxD, query_chunk, q_offset)[0]


def _window_chunk(k_BxSxGxD, v_BxSxGxD, num_heads: int, *, window: int, causal: bool, key_mask_BxS, scale: float,
                  dropout_rate: float, dropout_seed, chunk: int, k_start=0) -> Callable:
  """`fn(q_chunk [B, C, H, D], q_pos_C) -> (out,)`: a chunk of `chunk` consecutive queries over its band of keys;
  `k_BxSxGxD` holds the keys from position `k_start` on (a causal segment's band: its gradient buffers are the
  band's, not the sequence's)."""
  b, s, hkv, d = k_BxSxGxD.shape
  h, c = num_heads, chunk
  left, right = window - 1, (0 if causal else window - 1)
  span = c + left + right
  pad_k = lambda t: jnp.pad(t, ((0, 0), (left, right + c)) + ((0, 0),) * (t.ndim - 2))  # noqa: E731
  kp, vp = pad_k(k_BxSxGxD), pad_k(v_BxSxGxD)
  real = pad_k(jnp.ones((b, s), bool) if key_mask_BxS is None else key_mask_BxS)
  bh = _batch_head(b, hkv, h // hkv)

  def fn(qc_BxCxHxD, q_pos_C):
    start = q_pos_C[0] - k_start  # padded coordinates: key position p sits at p - k_start + left
    kc = jax.lax.dynamic_slice_in_dim(kp, start, span, axis=1)
    vc = jax.lax.dynamic_slice_in_dim(vp, start, span, axis=1)
    rc = jax.lax.dynamic_slice_in_dim(real, start, span, axis=1)
    k_pos = q_pos_C[0] - left + jnp.arange(span)
    delta = q_pos_C[:, None] - k_pos[None, :]
    band = (delta < window) & (delta >= (0 if causal else 1 - window))
    allowed = band[None] & rc[:, None, :]  # [B, C, span]
    q = _group(qc_BxCxHxD, hkv).astype(jnp.float32)
    keep = _keep_multiplier(dropout_seed, dropout_rate, bh[..., None, None], q_pos_C[:, None], k_pos[None, :])
    out, _ = _rows_attend(q, kc.astype(jnp.float32), vc.astype(jnp.float32), allowed[:, None, None], keep, scale)
    return (out.reshape(b, c, h, d),)
  return fn


def window_mask(num_queries: int, num_keys: int, *, window: int, causal: bool, q_pos_L: jax.Array,
                key_mask_BxS: jax.Array | None) -> jax.Array:
  """The token mask of `window_attention`: `[B or 1, 1, L, S]`."""
  delta = q_pos_L[:, None] - jnp.arange(num_keys)[None, :]
  band = (delta < window) & (delta >= (0 if causal else 1 - window))
  band = band[None, None]
  return band if key_mask_BxS is None else band & key_mask_BxS[:, None, None, :]


def summary_attention(q_BxLxHxD: jax.Array, k_BxSxGxD: jax.Array, v_BxSxGxD: jax.Array, *, k_pos_S: jax.Array,
                      key_valid_BxS: jax.Array | None, causal: bool, scale: float, q_offset=0,
                      dropout_rate: float = 0.0, dropout_seed: jax.Array | None = None,
                      query_chunk: int = DEFAULT_QUERY_CHUNK,
                      probs_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                      implementation: str = "xla"):
  """Every query over a short list of summary keys (compressed tokens, pooled blocks), key `j` visible to a causal
  query at `t >= k_pos_S[j]`. With `probs_fn(probs_BxGxgxCxS, q_pos_C) -> [B, C, ...]` the chunk's attention
  probabilities (before dropout, not differentiated) are reduced in the chunk, and its result returned as well: how
  NSA scores blocks without an `[L, S]` buffer. Returns float32 `[B, L, H, D]` (and the reductions)."""
  b, l, h, d = q_BxLxHxD.shape
  hkv = k_BxSxGxD.shape[2]
  valid = jnp.ones((b, k_BxSxGxD.shape[1]), bool) if key_valid_BxS is None else key_valid_BxS
  if implementation == "reference":
    q_pos = q_offset + jnp.arange(l)
    allowed = summary_mask(q_pos, k_pos_S, valid, causal)
    out = masked_attention_reference(q_BxLxHxD, k_BxSxGxD, v_BxSxGxD, allowed, scale=scale, q_pos_L=q_pos,
                                     k_pos_S=jnp.arange(k_pos_S.shape[0]), dropout_rate=dropout_rate,
                                     dropout_seed=dropout_seed)
    if probs_fn is None:
      return out
    scores = jnp.einsum("blxgd,bsxd->bxgls", _group(q_BxLxHxD, hkv).astype(jnp.float32),
                        k_BxSxGxD.astype(jnp.float32)) * scale
    probs, _ = _softmax_rows(scores, jnp.broadcast_to(allowed, (b, hkv, l, k_pos_S.shape[0]))[:, :, None])
    return out, probs_fn(jax.lax.stop_gradient(probs), q_pos)

  attend = lambda n, *_: _summary_chunk(k_BxSxGxD, v_BxSxGxD, h, n, k_pos_S=k_pos_S, key_valid_BxS=valid,  # noqa
                                    causal=causal, scale=scale, dropout_rate=dropout_rate,
                                    dropout_seed=dropout_seed, probs_fn=probs_fn)
  outs = _segmented(attend, q_BxLxHxD, (), query_chunk=query_chunk, q_offset=q_offset,
                    num_keys=k_BxSxGxD.shape[1], k_pos_S=k_pos_S if causal else None)
  return outs if probs_fn is not None else outs[0]


def summary_and_window_attention(q_BxLxHxD: jax.Array, weights_BxLxHx2: jax.Array, summary: dict, window: dict, *,
                                 causal: bool, scale: float, q_offset=0, dropout_rate: float = 0.0,
                                 query_chunk: int = DEFAULT_QUERY_CHUNK,
                                 probs_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None):
  """`weights[..., 0] * summary_attention(...) + weights[..., 1] * window_attention(...)` in one chunk loop (same
  values, as NSA mixes its compressed and window branches): one `[B, L, H, D]` output and one dQ buffer instead of one
  per branch. `summary`: `k`, `v` (the summary keys and values), `k_pos_S` (a host array), `key_valid_BxS`,
  `dropout_seed`; `window`: `k`, `v`, `window`, `key_mask_BxS`, `dropout_seed`. Float32 `[B, L, H, D]` (and
  `probs_fn`'s reductions, as `summary_attention`)."""
  b, l, h, d = q_BxLxHxD.shape
  c = max(1, min(query_chunk, l))
  sk, wk = summary["k"], window["k"]
  valid = jnp.ones((b, sk.shape[1]), bool) if summary["key_valid_BxS"] is None else summary["key_valid_BxS"]
  mask = jnp.ones((b, wk.shape[1]), bool) if window["key_mask_BxS"] is None else window["key_mask_BxS"]
  w = window["window"]

  def attend(n: int, first=None, end=None):
    """The chunk function of a segment of query positions [first, end) (None: every query, traced positions)."""
    far = _summary_chunk(sk, summary["v"], h, n, k_pos_S=summary["k_pos_S"], key_valid_BxS=valid, causal=causal,
                         scale=scale, dropout_rate=dropout_rate, dropout_seed=summary["dropout_seed"],
                         probs_fn=probs_fn)
    lo, hi = 0, wk.shape[1]
    if first is not None:  # the keys the segment's queries can reach
      lo, hi = max(0, first - w + 1), min(hi, end + (0 if causal else w - 1))
    band = lambda x: x[:, lo:hi]  # noqa: E731
    local = _window_chunk(band(wk), band(window["v"]), h, window=w, causal=causal, key_mask_BxS=band(mask),
                          scale=scale, dropout_rate=dropout_rate, dropout_seed=window["dropout_seed"], chunk=c,
                          k_start=lo)

    def fn(qc_BxCxHxD, q_pos_C, w_BxCxHx2):
      o_far, *reduced = far(qc_BxCxHxD, q_pos_C)
      (o_near,) = local(qc_BxCxHxD, q_pos_C)
      return (w_BxCxHx2[..., 0:1] * o_far + w_BxCxHx2[..., 1:2] * o_near, *reduced)
    return fn

  outs = _segmented(attend, q_BxLxHxD, (weights_BxLxHx2.astype(jnp.float32),), query_chunk=c, q_offset=q_offset,
                    num_keys=sk.shape[1], k_pos_S=summary["k_pos_S"] if causal else None)
  return outs if probs_fn is not None else outs[0]


def _summary_chunk(k_BxSxGxD, v_BxSxGxD, num_heads: int, n: int, *, k_pos_S, key_valid_BxS, causal: bool,
                   scale: float, dropout_rate: float, dropout_seed, probs_fn) -> Callable:
  """`fn(q_chunk, q_pos_C) -> (out, [probs_fn's reduction])` over the first `n` summary keys (a causal segment's
  visible ones; the rest have probability 0, padded back for `probs_fn`)."""
  b, num_keys, hkv, d = k_BxSxGxD.shape
  h = num_heads
  bh = _batch_head(b, hkv, h // hkv)
  k, v, ok, k_pos = k_BxSxGxD[:, :n], v_BxSxGxD[:, :n], key_valid_BxS[:, :n], k_pos_S[:n]

  def fn(qc_BxCxHxD, q_pos_C):
    allowed = ok[:, None, :] & ((k_pos[None, :] <= q_pos_C[:, None]) if causal else True)  # [B, C, n]
    q = _group(qc_BxCxHxD, hkv).astype(jnp.float32)
    keep = _keep_multiplier(dropout_seed, dropout_rate, bh[..., None, None], q_pos_C[:, None], jnp.arange(n)[None, :])
    out, probs = _rows_attend(q, k.astype(jnp.float32), v.astype(jnp.float32), allowed[:, None, None], keep, scale)
    out = out.reshape(b, -1, h, d)
    if probs_fn is None:
      return (out,)
    probs = jnp.pad(probs, ((0, 0),) * 4 + ((0, num_keys - n),))
    return out, probs_fn(jax.lax.stop_gradient(probs), q_pos_C)
  return fn


def _segmented(attend: Callable[..., Callable], q_BxLxHxD: jax.Array, extras: tuple, *, query_chunk: int, q_offset,
               num_keys: int, k_pos_S) -> tuple:
  """`_chunked(attend(num_keys), ...)` over the whole sequence (`k_pos_S` None: not causal), or over the causal
  segments (`causal_segments`), each with the summary keys its last query can see, joined. `attend(n, first, end)`
  also gets the segment's query positions where its chunk function can use them (a band of keys)."""
  segments = None if k_pos_S is None else causal_segments(q_BxLxHxD.shape[1], query_chunk, q_offset, k_pos_S)
  if segments is None:
    return _chunked(attend(num_keys), q_BxLxHxD, query_chunk, q_offset, extras)
  parts = [_chunked(attend(n, q_offset + start, q_offset + stop), q_BxLxHxD[:, start:stop], query_chunk,
                    q_offset + start,
                    tuple(x[:, start:stop] for x in extras)) for start, stop, n in segments]
  return tuple(jnp.concatenate(xs, axis=1) for xs in zip(*parts))


# Causal summary attention splits the queries into this many segments, each over the summary keys its last query can
# see (static shapes: one compiled chunk loop per segment): (1 + 2 + 3 + 4) / 16 = 62% of the unsegmented work,
# against 50% for an exact causal skip. Used from 2 chunks per segment up, with host (numpy) key positions.
CAUSAL_SEGMENTS = 4


def causal_segments(length: int, query_chunk: int, q_offset, k_pos_S) -> list[tuple[int, int, int]] | None:
  """[(first query, end query, visible summary keys)] of `CAUSAL_SEGMENTS` chunk-aligned query segments, or None
  when not segmenting (short inputs, a traced offset, traced or unsorted key positions)."""
  if not isinstance(k_pos_S, np.ndarray) or not isinstance(q_offset, (int, np.integer)):
    return None
  if k_pos_S.size == 0 or np.any(np.diff(k_pos_S) < 0):
    return None
  c = max(1, min(query_chunk, length))
  chunks = -(-length // c)
  if CAUSAL_SEGMENTS < 2 or chunks < 2 * CAUSAL_SEGMENTS:
    return None
  per = -(-chunks // CAUSAL_SEGMENTS) * c
  out = []
  for start in range(0, length, per):
    stop = min(length, start + per)
    visible = int(np.searchsorted(k_pos_S, q_offset + stop - 1, side="right"))
    out.append((start, stop, max(1, visible)))
  return out


def summary_mask(q_pos_L: jax.Array, k_pos_S: jax.Array, key_valid_BxS: jax.Array | None, causal: bool):
  """The token mask of `summary_attention`: `[B or 1, 1, L, S]`."""
  allowed = (k_pos_S[None, :] <= q_pos_L[:, None]) if causal else jnp.ones((q_pos_L.shape[0], k_pos_S.shape[0]), bool)
  allowed = allowed[None, None]
  return allowed if key_valid_BxS is None else allowed & key_valid_BxS[:, None, None, :]


def top_blocks(scores_BxLxGxN: jax.Array, num_selected: int) -> jax.Array:
  """Top-`num_selected` block indices per row, ties to the lower index (`lax.top_k`'s rule); blocks scored -inf
  (not allowed) come back as -1. Integers, not differentiated."""
  values, idx = jax.lax.top_k(jax.lax.stop_gradient(scores_BxLxGxN), num_selected)
  return jnp.where(values == -jnp.inf, -1, idx).astype(jnp.int32)


def first_real_position(key_mask_BxS: jax.Array | None, batch: int, num_keys: int, block_size: int) -> jax.Array:
  """`[B, Nb]`: the first real key position of each block (`num_keys` where it has none): a block is selectable
  by a causal query at `t` once `t` reaches it, the same rule in parallel and in decoding."""
  real = jnp.ones((batch, num_keys), bool) if key_mask_BxS is None else key_mask_BxS
  pos = jnp.where(real, jnp.arange(num_keys), num_keys).reshape(batch, num_keys // block_size, block_size)
  return jnp.min(pos, axis=-1)


def pad_length(x: jax.Array, multiple: int, axis: int = 1, value=0) -> jax.Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)
