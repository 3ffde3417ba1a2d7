"""Chunkwise-parallel gated linear attention in pure JAX (memory linear in length), and the chunk helpers the delta
rule shares.

The sequence is cut into chunks of `C` tokens (the last one padded with tokens that neither decay nor write). Inside
a chunk, with `b_i` the cumulative log-decay from the chunk's start (`b_i <= b_j` for `i >= j`):
  o_i = sum_{j <= i} (q_i * exp(b_i - b_j)) . k_j v_j   +   (q_i * exp(b_i)) S_in
  S_out = exp(b_C) S_in + sum_j (k_j * exp(b_C - b_j)) v_j^T
Every exponent is `<= 0` (differences are taken in log space, masked to the causal pairs *before* `exp`), so no
factor overflows, whatever the decay (near 0 or near 1) or the dtype: the fla NaN reports come from `exp(-b_j)`
factorizations that this form never builds. A decay per head is a `[C, C]` factor on the `q k^T` scores (matmuls);
a decay per key dimension (GLA) is the `[C, C, K]` factor, built one chunk at a time inside the scan. Segments reset
the state: pairs in different segments are masked, and `S_in` reaches a token (and the next chunk) only inside the
segment it belongs to. Inputs are computed in float32 (states too); the output has v's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.gated_linear.reference import state_dtype

DEFAULT_CHUNK = 64


def record_form(op: str, detail: str) -> None:
  """Says that `op` runs the "state" sequence-parallel form: `kernels.sequence.ran` (recorded for the caller, or
  logged once) where the tree has that recorder, else one log line."""
  from kernels import sequence  # pylint: disable=import-outside-toplevel
  ran = getattr(sequence, "ran", None)
  if ran is not None:
    ran(op, "state", detail)
  else:
    sequence.log_once(op, f"state passing: {detail}")


def pad_to_chunks(x: jax.Array, chunk: int, mode: str = "constant") -> jax.Array:
  """`[B, L, ...]` padded along L to a multiple of `chunk` (zeros, or the edge value for segment ids)."""
  pad = -x.shape[1] % chunk
  if not pad:
    return x
  return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), mode=mode)


def to_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """`[B, N*C, ...]` -> `[N, B, C, ...]` (chunks lead, so `lax.scan` walks them)."""
  b, length = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, length // chunk, chunk, *x.shape[2:]), 1, 0)


def from_chunks(x_NxBxC: jax.Array, length: int) -> jax.Array:
  n, b, c = x_NxBxC.shape[:3]
  return jnp.moveaxis(x_NxBxC, 0, 1).reshape(b, n * c, *x_NxBxC.shape[3:])[:, :length]


def segment_chunks(segment_ids: jax.Array | None, b: int, length: int, chunk: int):
  """Per chunk: the tokens' segment ids `[N, B, C]` and the segment of the token before the chunk `[N, B]` (the
  first chunk: its own first token's, so an initial state continues the first segment)."""
  seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  prev = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
  seg, prev = pad_to_chunks(seg, chunk, "edge"), pad_to_chunks(prev, chunk, "edge")
  return to_chunks(seg, chunk), to_chunks(prev, chunk)[:, :, 0]


def chunk_masks(seg_BxC: jax.Array, prev_B: jax.Array):
  """Segment masks of one chunk: `pairs [B, C, C]` (j <= i, same segment), `enter [B, C]` (S_in reaches token i),
  `keep [B, C]` (token j's write reaches the chunk's end), `carry [B]` (S_in reaches the chunk's end)."""
  c = seg_BxC.shape[1]
  causal = jnp.tril(jnp.ones((c, c), bool))
  pairs = causal & (seg_BxC[:, :, None] == seg_BxC[:, None, :])
  last = seg_BxC[:, -1]
  return pairs, seg_BxC == prev_B[:, None], seg_BxC == last[:, None], last == prev_B


def decay_matrix(cum_BxCxH: jax.Array, pairs_BxCxC: jax.Array) -> jax.Array:
  """`exp(b_i - b_j)` on the allowed pairs, 0 elsewhere: `[B, H, C, C]` (exponents masked before exp)."""
  diff = cum_BxCxH[:, :, None, :] - cum_BxCxH[:, None, :, :]  # [B, C(i), C(j), H]
  pairs = pairs_BxCxC[..., None]
  return jnp.moveaxis(jnp.where(pairs, jnp.exp(jnp.where(pairs, diff, 0.0)), 0.0), -1, 1)


def gated_linear_xla(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxV: jax.Array, log_decay: jax.Array, *,
                     chunk_size: int = DEFAULT_CHUNK, segment_ids: jax.Array | None = None,
                     initial_state: jax.Array | None = None):
  """Chunked gated linear attention (see the module docstring). `log_decay` is `[B, L, H]` (a decay per head) or
  `[B, L, H, K]` (per key dimension). Returns `(out [B, L, H, V] in v's dtype, final state [B, H, K, V])`."""
  b, length, h, dk = q_BxLxHxK.shape
  dv = v_BxLxHxV.shape[-1]
  dt = state_dtype(q_BxLxHxK, k_BxLxHxK, v_BxLxHxV)
  per_key = log_decay.ndim == 4
  chunk = min(chunk_size, length)
  q, k, v, g = (to_chunks(pad_to_chunks(x.astype(dt), chunk), chunk)
                for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, log_decay))
  seg, prev = segment_chunks(segment_ids, b, length, chunk)
  state = jnp.zeros((b, h, dk, dv), dt) if initial_state is None else initial_state.astype(dt)

  def step(state_BxHxKxV, inputs):
    q, k, v, g, seg, prev = inputs
    pairs, enter, keep, carry = chunk_masks(seg, prev)
    cum = jnp.cumsum(g, axis=1)  # [B, C, H(, K)], <= 0 and decreasing
    total = cum[:, -1]  # [B, H(, K)]
    if per_key:
      diff = cum[:, :, None] - cum[:, None, :]  # [B, C(i), C(j), H, K]
      m = pairs[..., None, None]
      factor = jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)
      scores = jnp.einsum("bihk,bjhk,bijhk->bhij", q, k, factor)
      q_in = q * jnp.exp(cum)
      k_out = k * jnp.exp(total[:, None] - cum)
      s_carry = jnp.exp(total)[..., None] * state_BxHxKxV
    else:
      scores = jnp.einsum("bihk,bjhk->bhij", q, k) * decay_matrix(cum, pairs)
      q_in = q * jnp.exp(cum)[..., None]
      k_out = k * jnp.exp(total[:, None] - cum)[..., None]
      s_carry = jnp.exp(total)[..., None, None] * state_BxHxKxV
    q_in = jnp.where(enter[:, :, None, None], q_in, 0.0)
    k_out = jnp.where(keep[:, :, None, None], k_out, 0.0)
    out = jnp.einsum("bhij,bjhv->bihv", scores, v) + jnp.einsum("bihk,bhkv->bihv", q_in, state_BxHxKxV)
    state = jnp.where(carry[:, None, None, None], s_carry, 0.0) + jnp.einsum("bjhk,bjhv->bhkv", k_out, v)
    return state, out

  # The per-key factor is [B, C, C, H, K] per chunk: recomputed in the backward pass rather than saved per chunk.
  body = jax.checkpoint(step) if per_key else step
  state, out = jax.lax.scan(body, state, (q, k, v, g, seg, prev))
  return from_chunks(out, length).astype(v_BxLxHxV.dtype), state


__all__ = ["DEFAULT_CHUNK", "chunk_masks", "decay_matrix", "from_chunks", "gated_linear_xla", "pad_to_chunks",
           "record_form", "segment_chunks", "to_chunks"]
