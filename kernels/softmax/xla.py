"""Flash attention in pure JAX: online softmax over key chunks, a custom_vjp backward that recomputes the chunk scores
from the saved log-sum-exp. Memory O(L·C) for chunk C, never an `[L, S]` buffer; float32 accumulation.

The block primitive, for ring attention (context parallelism) and anything else that combines partial softmaxes:

  flash_block(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, *, key_mask=None, causal=False, scale=None, dropout_rate=0.0,
              seed=None, q_offset=0, k_offset=0, alibi_slopes=None, chunk_size=DEFAULT_CHUNK)
    -> (out_BxLxHxD float32, lse_BxHxL float32)

  `out` is the softmax-weighted sum of `v` over the keys of THIS block only (normalized by this block's denominator),
  `lse` the log-sum-exp of this block's allowed scores (`MASK_VALUE` for a row with no allowed key, whose `out` is 0).
  Two blocks over disjoint keys combine exactly: `lse = logaddexp(lse1, lse2)`,
  `out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2` (rows with neither: both weights are finite, outs are 0).
  `q_offset`, `k_offset` are the GLOBAL positions of the block's first query and first key (Python ints, or int32
  scalars when traced, e.g. from `lax.axis_index`): causal masking (key position <= query position), the ALiBi bias
  `-slope_h * |q_pos - k_pos|` and the dropout hash counters all use global positions, so a sharded computation gives
  the same values and the same dropout mask as the unsharded one. The dropout counter's batch-head index is
  `batch * heads + head` of the local tensors (shard along length, not batch, or offset the batch yourself).
  The custom_vjp takes cotangents of BOTH outputs: with `d lse_i / d s_ij = p_ij`, the backward uses
  `delta_i = rowsum(dO_i * O_i) - dlse_i` and `ds_ij = p_ij * (dp_ij - delta_i)`.
  With concrete (int) offsets and `causal=True` the chunk pairs entirely above the diagonal are skipped (not
  computed, in the forward and in the backward: about half the work); with traced offsets every pair is computed and
  masked (a ring step can skip whole blocks itself).

Dropout (`dropout_rate` > 0 with an int32 `seed`, `kernels.common.dropout_seed`) drops the normalized weights with
the counter hash `kernels.common.dropout_keep(seed, batch * heads + head, q_pos, k_pos, rate)`, the mask the reference
and the block-sparse kernels use, regenerated in the backward (inverted dropout: kept weights scaled by 1/(1-rate);
the denominator is the undropped one).

Lengths need not be multiples of the chunk: queries and keys are padded internally and the padded keys masked.
`alibi_slopes` and masks take no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import MASK_VALUE, dropout_keep

DEFAULT_CHUNK = 512


def _pairs(n_q: int, n_k: int, c_q: int, c_k: int, causal: bool, q_offset, k_offset) -> np.ndarray:
  """`[P, 2]` int32 (query chunk, key chunk) pairs to compute, sorted by query chunk: all of them, or for causal with
  concrete offsets only those with some key at or before some query (the rest are entirely masked)."""
  i, j = np.meshgrid(np.arange(n_q), np.arange(n_k), indexing="ij")
  i, j = i.reshape(-1), j.reshape(-1)
  if causal and isinstance(q_offset, (int, np.integer)) and isinstance(k_offset, (int, np.integer)):
    keep = q_offset + (i + 1) * c_q - 1 >= k_offset + j * c_k
    i, j = i[keep], j[keep]
  return np.stack([i, j], axis=1).astype(np.int32)


class _Static:
  """Static description of one call (hashable: a non-differentiable custom_vjp argument)."""

  def __init__(self, *, causal, scale, rate, c_q, c_k, length, keys, pairs: np.ndarray):
    self.causal, self.scale, self.rate, self.c_q, self.c_k = causal, scale, rate, c_q, c_k
    self.length, self.keys, self.pairs = length, keys, pairs
    self._key = (causal, scale, rate, c_q, c_k, length, keys, pairs.tobytes())

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key == other._key


def _scores(st: _Static, q_BxCxHxD, k_BxCxHxD, i, j, kvalid_BxS, q_offset, k_offset, slopes_H, seed, heads):
  """Scores of query chunk i against key chunk j (float32 `[B, H, Cq, Ck]`, masked to `MASK_VALUE`), the allowed
  mask, and the dropout multiplier (None without dropout)."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q_BxCxHxD, k_BxCxHxD, preferred_element_type=jnp.float32) * st.scale
  q_pos = q_offset + i * st.c_q + jnp.arange(st.c_q, dtype=jnp.int32)
  k_local = j * st.c_k + jnp.arange(st.c_k, dtype=jnp.int32)
  k_pos = k_offset + k_local
  allowed = jax.lax.dynamic_slice_in_dim(kvalid_BxS, j * st.c_k, st.c_k, axis=1)[:, None, None, :]
  if st.causal:
    allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None, None]
  if slopes_H is not None:
    dist = jnp.abs(q_pos[:, None] - k_pos[None, :]).astype(jnp.float32)
    s = s - slopes_H.astype(jnp.float32)[None, :, None, None] * dist[None, None]
  s = jnp.where(allowed, s, MASK_VALUE)
  z = None
  if st.rate > 0.0:
    b = s.shape[0]
    bh = (jnp.arange(b, dtype=jnp.int32)[:, None] * heads + jnp.arange(heads, dtype=jnp.int32)[None, :])
    keep = dropout_keep(seed, bh[:, :, None, None], q_pos[None, None, :, None], k_pos[None, None, None, :], st.rate)
    z = jnp.where(keep, jnp.float32(1.0 / (1.0 - st.rate)), jnp.float32(0.0))
  return s, allowed, z


def _chunk(x, idx, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, idx * size, size, axis=axis)


def _forward(st: _Static, q, k, v, kvalid, seed, q_offset, k_offset, slopes):
  """Padded `q [B, Lp, H, D]`, `k, v [B, Sp, H, D]` -> (out [B, H, Lp, Dv] f32, lse [B, H, Lp] f32)."""
  b, lp, h, _ = q.shape
  dv = v.shape[-1]
  m0 = jnp.full((b, h, lp), MASK_VALUE, jnp.float32)
  l0 = jnp.zeros((b, h, lp), jnp.float32)
  acc0 = jnp.zeros((b, h, lp, dv), jnp.float32)

  def step(carry, ij):
    m, l, acc = carry
    i, j = ij[0], ij[1]
    s, allowed, z = _scores(st, _chunk(q, i, st.c_q, 1), _chunk(k, j, st.c_k, 1), i, j, kvalid, q_offset, k_offset,
                            slopes, seed, h)
    m_old, l_old, acc_old = _chunk(m, i, st.c_q, 2), _chunk(l, i, st.c_q, 2), _chunk(acc, i, st.c_q, 2)
    m_new = jnp.maximum(m_old, s.max(axis=-1))
    corr = jnp.exp(m_old - m_new)
    # Zero the masked weights explicitly: with a finite floor, a row whose keys are all masked would weigh them 1.
    p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
    l_new = l_old * corr + p.sum(axis=-1)
    pz = p if z is None else p * z
    vc = _chunk(v, j, st.c_k, 1)
    acc_new = acc_old * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", pz.astype(vc.dtype), vc,
                                                     preferred_element_type=jnp.float32)
    put = lambda x, u: jax.lax.dynamic_update_slice_in_dim(x, u, i * st.c_q, axis=2)  # noqa: E731
    return (put(m, m_new), put(l, l_new), put(acc, acc_new)), None

  (m, l, acc), _ = jax.lax.scan(step, (m0, l0, acc0), jnp.asarray(st.pairs))
  has_keys = l > 0.0
  out = acc / jnp.where(has_keys, l, 1.0)[..., None]
  lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), MASK_VALUE)
  return out, lse


def _backward(st: _Static, q, k, v, kvalid, seed, q_offset, k_offset, slopes, out, lse, d_out, d_lse):
  """Gradients of the padded inputs; `out`, `d_out` `[B, H, Lp, Dv]`, `lse`, `d_lse` `[B, H, Lp]`, all float32."""
  h = q.shape[2]
  delta = jnp.sum(d_out * out, axis=-1) - d_lse  # [B, H, Lp]
  dq0 = jnp.zeros(q.shape, jnp.float32)
  dk0 = jnp.zeros(k.shape, jnp.float32)
  dv0 = jnp.zeros(v.shape, jnp.float32)

  def step(carry, ij):
    dq, dk, dv = carry
    i, j = ij[0], ij[1]
    qc, kc, vc = _chunk(q, i, st.c_q, 1), _chunk(k, j, st.c_k, 1), _chunk(v, j, st.c_k, 1)
    s, allowed, z = _scores(st, qc, kc, i, j, kvalid, q_offset, k_offset, slopes, seed, h)
    p = jnp.where(allowed, jnp.exp(s - _chunk(lse, i, st.c_q, 2)[..., None]), 0.0)
    do = _chunk(d_out, i, st.c_q, 2)
    dp = jnp.einsum("bhqd,bkhd->bhqk", do, vc, preferred_element_type=jnp.float32)
    pz = p
    if z is not None:
      dp, pz = dp * z, p * z
    ds = p * (dp - _chunk(delta, i, st.c_q, 2)[..., None]) * st.scale
    dv_j = jnp.einsum("bhqk,bhqd->bkhd", pz, do, preferred_element_type=jnp.float32)
    dk_j = jnp.einsum("bhqk,bqhd->bkhd", ds, qc, preferred_element_type=jnp.float32)
    dq_i = jnp.einsum("bhqk,bkhd->bqhd", ds, kc, preferred_element_type=jnp.float32)
    add = lambda x, u, idx, size: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        x, _chunk(x, idx, size, 1) + u, idx * size, axis=1)
    return (add(dq, dq_i, i, st.c_q), add(dk, dk_j, j, st.c_k), add(dv, dv_j, j, st.c_k)), None

  (dq, dk, dv), _ = jax.lax.scan(step, (dq0, dk0, dv0), jnp.asarray(st.pairs))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, kvalid, seed, q_offset, k_offset, slopes):
  return _forward(st, q, k, v, kvalid, seed, q_offset, k_offset, slopes)


def _flash_fwd(st, q, k, v, kvalid, seed, q_offset, k_offset, slopes):
  out, lse = _forward(st, q, k, v, kvalid, seed, q_offset, k_offset, slopes)
  return (out, lse), (q, k, v, kvalid, seed, q_offset, k_offset, slopes, out, lse)


def _flash_bwd(st, res, cts):
  q, k, v, kvalid, seed, q_offset, k_offset, slopes, out, lse = res
  d_out, d_lse = cts
  dq, dk, dv = _backward(st, q, k, v, kvalid, seed, q_offset, k_offset, slopes, out, lse,
                         d_out.astype(jnp.float32), d_lse.astype(jnp.float32))
  zero = lambda x: None if x is None else jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else None  # noqa
  return dq, dk, dv, None, None, None, None, zero(slopes)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _ceil_to(n: int, m: int) -> int:
  return -(-n // m) * m


def flash_block(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array, *,
                key_mask: jax.Array | None = None, causal: bool = False, scale: float | None = None,
                dropout_rate: float = 0.0, seed: jax.Array | None = None, q_offset=0, k_offset=0,
                alibi_slopes: jax.Array | None = None, chunk_size: int = DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array]:
  """One block of flash attention: `(out_BxLxHxD float32, lse_BxHxL float32)` (see the module docstring).

  Args:
    key_mask: optional bool `[batch, keys]`, True = a real key.
    seed: int32 scalar of the dropout hash (`kernels.common.dropout_seed`); dropout applies when given and
      `dropout_rate > 0`.
    q_offset, k_offset: global positions of the first query / key (ints, or int32 scalars).
    alibi_slopes: optional float `[heads]`: adds `-slope_h * |q_pos - k_pos|` to the scores.
    chunk_size: query and key chunk length (a Python int); lengths need not be multiples of it.
  """
  b, length, h, d = q_BxLxHxD.shape
  keys = k_BxSxHxD.shape[1]
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size=}")
  scale = d ** -0.5 if scale is None else float(scale)
  rate = float(dropout_rate) if seed is not None else 0.0
  c_q, c_k = min(int(chunk_size), length), min(int(chunk_size), keys)
  lp, sp = _ceil_to(length, c_q), _ceil_to(keys, c_k)
  pairs = _pairs(lp // c_q, sp // c_k, c_q, c_k, bool(causal), q_offset, k_offset)
  st = _Static(causal=bool(causal), scale=scale, rate=rate, c_q=c_q, c_k=c_k, length=length, keys=keys, pairs=pairs)
  kvalid = jnp.ones((b, keys), bool) if key_mask is None else jnp.asarray(key_mask).astype(bool)
  pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
  if len(pairs) == 0:  # every key after every query: nothing to attend
    return jnp.zeros((b, length, h, v_BxSxHxD.shape[-1]), jnp.float32), jnp.full((b, h, length), MASK_VALUE)
  out, lse = _flash(st, pad(q_BxLxHxD, lp), pad(k_BxSxHxD, sp), pad(v_BxSxHxD, sp), pad(kvalid, sp),
                    None if rate == 0.0 else jnp.asarray(seed, jnp.int32),
                    jnp.asarray(q_offset, jnp.int32), jnp.asarray(k_offset, jnp.int32),
                    None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32))
  return jnp.swapaxes(out, 1, 2)[:, :length], lse[:, :, :length]


def softmax_attention_xla(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array, *,
                          key_mask: jax.Array | None = None, causal: bool = False, scale: float | None = None,
                          dropout_rate: float = 0.0, dropout_seed: jax.Array | None = None,
                          alibi_slopes: jax.Array | None = None, chunk_size: int = DEFAULT_CHUNK) -> jax.Array:
  """Flash softmax attention, the output in the dtype of `q`. Query i sits at position `i + S - L` (queries aligned to
  the last keys, as in decoding), key j at j: for causal masking, ALiBi and the dropout counters."""
  out, _ = flash_block(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, key_mask=key_mask, causal=causal, scale=scale,
                       dropout_rate=dropout_rate, seed=dropout_seed,
                       q_offset=k_BxSxHxD.shape[1] - q_BxLxHxD.shape[1], k_offset=0, alibi_slopes=alibi_slopes,
                       chunk_size=chunk_size)
  return out.astype(q_BxLxHxD.dtype)


__all__ = ["DEFAULT_CHUNK", "flash_block", "softmax_attention_xla"]
