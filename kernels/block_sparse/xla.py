"""The flash-style XLA form of block-sparse attention: online softmax over the allowed blocks only, and a custom_vjp
backward that recomputes the scores from the saved log-sum-exp (no score-sized residual is kept).

The layout is planned on the host (`tables.xla_plan`) into three parts:
  dense rows   query blocks whose row is (nearly) full, e.g. global tokens: attention over all keys, masked by their
               layout row, in chunks of keys (`_DENSE_KEYS_PER_STEP`) under one running softmax;
  global slab  key blocks (nearly) every other row sees: one shared `[B, H, Ns, C, G·C]` score slab against the
               global keys, not copied per row;
  band         the remaining allowed key blocks of the other rows, listed in index tables padded to the widest
               *sparse* row only; a scan gathers a few listed blocks per step (`_BAND_KEYS_PER_STEP` keys) and folds
               them into the running softmax that the slab started, so no `[.., K, C, D]` copy and no `[.., K·C]`
               scores exist at once.
Time is O(L·K·C + G·C·L) as before; memory is O(L·D) plus one step's scores. The forward keeps per query the
log-sum-exp of its allowed scores; the backward walks the same pieces again: it recomputes each piece's scores and
weights `P = exp(S - lse)`, regenerates the dropout mask from the seed (`kernels.common.dropout_keep`: the mask of the
reference and the Pallas kernels), and forms `dS = P ∘ (dP - rowsum(dO ∘ O))` (FlashAttention-2; exact with dropout,
since `O` is the dropped-out output). Key/value gradients of the band are scatter-added into their blocks. Scores,
softmax statistics and every accumulation are float32 whatever the input dtype; matmul operands keep the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import MASK_VALUE, dropout_keep
from kernels.block_sparse.tables import XlaPlan, xla_plan

# Keys per scan step. The band gathers ceil(this / C) listed blocks at a time: wider steps make larger matmuls (the
# CPU's small-matmul overhead dominates at C = 32) at the cost of one larger step-sized buffer.
_BAND_KEYS_PER_STEP = 256
_DENSE_KEYS_PER_STEP = 512

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one call (closed over by the custom_vjp)."""

  plan: XlaPlan
  batch: int
  heads: int
  blocks: int  # N
  block: int  # C
  causal: bool
  scale: float
  rate: float  # 0.0: no dropout

  @property
  def length(self) -> int:
    return self.blocks * self.block


# ----------------------------------------------------------------------------------------------------------------------
# Host-side step tables.


def _band_steps(plan: XlaPlan, c: int) -> tuple[np.ndarray, np.ndarray] | None:
  """The band's index table regrouped into scan steps: `idx, valid [T, H', Ns, S]` (S listed blocks per step, the
  table padded with invalid block-0 entries to T * S), or None when there is no band."""
  if not plan.band_width:
    return None
  k = plan.band_idx.shape[-1]
  per_step = max(1, min(k, _BAND_KEYS_PER_STEP // c))
  steps = -(-k // per_step)
  per_step = -(-k // steps)  # the same number of steps with the least padding
  pad = steps * per_step - k
  idx = np.pad(plan.band_idx, ((0, 0), (0, 0), (0, pad)))
  valid = np.pad(plan.band_valid, ((0, 0), (0, 0), (0, pad)))
  shape = idx.shape[:2] + (steps, per_step)
  return (np.moveaxis(idx.reshape(shape), 2, 0).astype(np.int32), np.moveaxis(valid.reshape(shape), 2, 0))


def _dense_chunk_blocks(n: int, c: int) -> int:
  """Blocks per key chunk of the dense rows: the largest divisor of N with at most `_DENSE_KEYS_PER_STEP` keys."""
  return max(s for s in range(1, n + 1) if n % s == 0 and (s == 1 or s * c <= _DENSE_KEYS_PER_STEP))


# ----------------------------------------------------------------------------------------------------------------------
# One piece of scores: its einsums, its mask, its dropout mask; forward update and backward contribution.
#
# Queries are `[B, H, R, C, D]` (R query blocks); a piece's keys are either shared by all R rows (`[B, H, W, D]`: dense
# rows, the slab) or gathered per row (`[B, H, R, W, D]`: the band). Scores are `[B, H, R, C, W]`.


def _eqs(gathered: bool) -> dict[str, str]:
  kv = "bhrwd" if gathered else "bhwd"
  return dict(s=f"bhrqd,{kv}->bhrqw", pv=f"bhrqw,{kv}->bhrqd", t=f"bhrqw,bhrqd->{kv[:-1]}d")


def _scores(spec: _Spec, q_R, k_piece, gathered: bool) -> jax.Array:
  return jnp.einsum(_eqs(gathered)["s"], q_R, k_piece, preferred_element_type=F32) * spec.scale


def _keep(spec: _Spec, seed, q_pos, k_pos) -> jax.Array | None:
  """The dropout keep-mask of a piece (None without dropout): counters broadcast to the scores' shape."""
  if not spec.rate:
    return None
  bh = (jnp.arange(spec.batch)[:, None] * spec.heads + jnp.arange(spec.heads)[None, :])[:, :, None, None, None]
  return dropout_keep(seed, bh, q_pos, k_pos, spec.rate)


def _drop(spec: _Spec, x, keep):
  return x if keep is None else jnp.where(keep, x * (1.0 / (1.0 - spec.rate)), 0.0)


def _online_update(spec: _Spec, carry, s, allowed, keep, v_piece, gathered: bool):
  """Folds one piece into the running (max, sum, weighted values) of its queries."""
  m, l, acc = carry
  s = jnp.where(allowed, s, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  # Masked entries are zeroed by the `where`, so a row that so far saw nothing (m_new = MASK_VALUE) stays at 0.
  p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
  alpha = jnp.exp(m - m_new)
  l = alpha * l + jnp.sum(p, axis=-1)
  pv = jnp.einsum(_eqs(gathered)["pv"], _drop(spec, p, keep).astype(v_piece.dtype), v_piece,
                  preferred_element_type=F32)
  return m_new, l, alpha[..., None] * acc + pv


def _piece_grads(spec: _Spec, s, allowed, keep, lse, dvec, do_R, q_R, k_piece, v_piece, gathered: bool):
  """(dq [B, H, R, C, D], dk and dv of the piece's keys) from the recomputed scores `s`."""
  eq = _eqs(gathered)
  p = jnp.where(allowed, jnp.exp(s - lse[..., None]), 0.0)
  dv = jnp.einsum(eq["t"], _drop(spec, p, keep).astype(do_R.dtype), do_R, preferred_element_type=F32)
  dp = _drop(spec, jnp.einsum(eq["s"], do_R, v_piece, preferred_element_type=F32), keep)
  ds = p * (dp - dvec[..., None])
  dq = jnp.einsum(eq["pv"], ds.astype(k_piece.dtype), k_piece, preferred_element_type=F32) * spec.scale
  dk = jnp.einsum(eq["t"], ds.astype(q_R.dtype), q_R, preferred_element_type=F32) * spec.scale
  return dq, dk, dv


def _init(shape_BxHxRxC, dv: int):
  return (jnp.full(shape_BxHxRxC, MASK_VALUE, F32), jnp.zeros(shape_BxHxRxC, F32),
          jnp.zeros(shape_BxHxRxC + (dv,), F32))


def _finish(m, l, acc):
  """Normalized output and log-sum-exp; a query with no allowed key outputs 0 (its lse is never used: every weight
  of such a row is masked)."""
  seen = l > 0.0
  safe = jnp.where(seen, l, 1.0)
  return jnp.where(seen[..., None], acc / safe[..., None], 0.0), jnp.where(seen, m + jnp.log(safe), 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# The pieces of the layout. Each is used twice: `fwd` folds it into the running softmax, `bwd` gives its gradients.


class _Pieces:
  """The layout's pieces for one call: block views of the inputs plus the host tables, with forward and backward
  walks over the dense rows and over the sparse rows (slab, then band steps)."""

  def __init__(self, spec: _Spec, q, k, v, kv_mask, seed):
    b, h, n, c = spec.batch, spec.heads, spec.blocks, spec.block
    self.spec, self.seed = spec, seed
    self.q, self.k, self.v = (self.blocks(x) for x in (q, k, v))  # [B, H, N, C, D]
    self.mask_BxNxC = None if kv_mask is None else kv_mask.astype(bool).reshape(b, n, c)
    self.pos_NxC = jnp.arange(n * c).reshape(n, c)
    self.dv = v.shape[-1]
    self.heads = np.arange(h)[:, None, None]  # broadcasts a shared layout head over the heads

  def blocks(self, x_BxLxHxD):  # -> [B, H, N, C, D]
    s = self.spec
    return jnp.transpose(x_BxLxHxD.reshape(s.batch, s.blocks, s.block, s.heads, x_BxLxHxD.shape[-1]), (0, 3, 1, 2, 4))

  def _allowed(self, block_allowed, k_pos, q_pos, key_mask):
    """Token mask of a piece from its block mask (`[.., W]`, already repeated to tokens), causal and padding."""
    allowed = block_allowed
    if self.spec.causal:
      allowed = allowed & (k_pos <= q_pos)
    if key_mask is not None:
      allowed = allowed & key_mask
    return allowed

  # Dense rows: key chunks of `s_blocks` blocks in a scan; keys `[T, B, H, W, D]` as scan inputs.
  def dense_chunks(self):
    spec, plan = self.spec, self.spec.plan
    b, h, n, c = spec.batch, spec.heads, spec.blocks, spec.block
    s_blocks = _dense_chunk_blocks(n, c)
    t, w = n // s_blocks, s_blocks * c
    chunks = lambda x: jnp.moveaxis(x.reshape(b, h, t, w, x.shape[-1]), 2, 0)  # noqa: E731  [B,H,N,C,D] -> [T,B,H,W,D]
    allowed = np.moveaxis(plan.dense_allowed.reshape(plan.dense_allowed.shape[:2] + (t, s_blocks)), 2, 0)
    mask = None if self.mask_BxNxC is None else jnp.moveaxis(self.mask_BxNxC.reshape(b, t, w), 1, 0)  # [T, B, W]
    return t, w, chunks, jnp.asarray(allowed), mask

  def dense_piece(self, rows, j, allowed_HxRxS, mask_BxW, w):
    """(allowed, keep) of dense-row key chunk `j`."""
    c = self.spec.block
    k_pos = (j * w + jnp.arange(w))[None, None, None, None, :]
    q_pos = self.pos_NxC[rows][None, None, :, :, None]
    block = jnp.repeat(allowed_HxRxS, c, axis=-1)[None, :, :, None, :]
    key_mask = None if mask_BxW is None else mask_BxW[:, None, None, None, :]
    return self._allowed(block, k_pos, q_pos, key_mask), _keep(self.spec, self.seed, q_pos, k_pos)

  def slab(self, rows):
    """(keys, values, allowed, keep) of the global slab: keys `[B, H, G·C, D]` shared by the sparse rows."""
    spec, plan = self.spec, self.spec.plan
    b, h, c, g = spec.batch, spec.heads, spec.block, plan.global_cols
    k_g = self.k[:, :, g].reshape(b, h, g.size * c, -1)
    v_g = self.v[:, :, g].reshape(b, h, g.size * c, self.dv)
    k_pos = self.pos_NxC[g].reshape(1, 1, 1, 1, -1)
    q_pos = self.pos_NxC[rows][None, None, :, :, None]
    block = jnp.repeat(jnp.asarray(plan.slab_allowed), c, axis=-1)[None, :, :, None, :]
    key_mask = None if self.mask_BxNxC is None else self.mask_BxNxC[:, g].reshape(b, 1, 1, 1, g.size * c)
    return k_g, v_g, self._allowed(block, k_pos, q_pos, key_mask), _keep(spec, self.seed, q_pos, k_pos)

  def band_piece(self, rows, idx_HxRxS, valid_HxRxS):
    """(keys, values, allowed, keep) of one band step: keys `[B, H, Ns, S·C, D]` gathered per row."""
    spec = self.spec
    b, h, c = spec.batch, spec.heads, spec.block
    r, s = idx_HxRxS.shape[1:]
    k_j = self.k[:, self.heads, idx_HxRxS].reshape(b, h, r, s * c, -1)
    v_j = self.v[:, self.heads, idx_HxRxS].reshape(b, h, r, s * c, self.dv)
    # Token positions from iota (fused by XLA), not a host constant the size of the scores.
    k_pos = (idx_HxRxS[..., None] * c + jnp.arange(c)).reshape(1, -1, r, 1, s * c)
    q_pos = self.pos_NxC[rows][None, None, :, :, None]
    block = jnp.repeat(valid_HxRxS, c, axis=-1)[None, :, :, None, :]
    key_mask = None
    if self.mask_BxNxC is not None:
      key_mask = self.mask_BxNxC[:, idx_HxRxS].reshape(b, -1, r, 1, s * c)
    return k_j, v_j, self._allowed(block, k_pos, q_pos, key_mask), _keep(spec, self.seed, q_pos, k_pos)


def _dense_fwd(pc: _Pieces, rows: np.ndarray):
  spec = pc.spec
  q_R = pc.q[:, :, rows]
  t, w, chunks, allowed, mask = pc.dense_chunks()

  def step(carry, xs):
    j, k_j, v_j, allowed_j, mask_j = xs
    a, keep = pc.dense_piece(rows, j, allowed_j, mask_j, w)
    return _online_update(spec, carry, _scores(spec, q_R, k_j, False), a, keep, v_j, False), None

  carry = _init(q_R.shape[:4], pc.dv)
  carry = jax.lax.scan(step, carry, (jnp.arange(t), chunks(pc.k), chunks(pc.v), allowed, mask))[0]
  return _finish(*carry)


def _dense_bwd(pc: _Pieces, rows: np.ndarray, lse, dvec, do_R):
  """dq of the dense rows `[B, H, Nd, C, D]` and their dk, dv for every key `[B, H, N, C, D]`."""
  spec = pc.spec
  q_R = pc.q[:, :, rows]
  t, w, chunks, allowed, mask = pc.dense_chunks()

  def step(dq, xs):
    j, k_j, v_j, allowed_j, mask_j = xs
    a, keep = pc.dense_piece(rows, j, allowed_j, mask_j, w)
    dq_j, dk_j, dv_j = _piece_grads(spec, _scores(spec, q_R, k_j, False), a, keep, lse, dvec, do_R, q_R, k_j, v_j,
                                    False)
    return dq + dq_j, (dk_j, dv_j)

  dq = jnp.zeros(q_R.shape, F32)
  dq, (dk, dv) = jax.lax.scan(step, dq, (jnp.arange(t), chunks(pc.k), chunks(pc.v), allowed, mask))
  unchunk = lambda x: jnp.moveaxis(x, 0, 2).reshape(spec.batch, spec.heads, spec.blocks, spec.block, -1)  # noqa: E731
  return dq, unchunk(dk), unchunk(dv)


def _sparse_fwd(pc: _Pieces, rows: np.ndarray):
  spec = pc.spec
  q_R = pc.q[:, :, rows]
  carry = _init(q_R.shape[:4], pc.dv)
  if spec.plan.global_cols.size:
    k_g, v_g, a, keep = pc.slab(rows)
    carry = _online_update(spec, carry, _scores(spec, q_R, k_g, False), a, keep, v_g, False)
  steps = _band_steps(spec.plan, spec.block)
  if steps is not None:
    def step(carry, xs):
      k_j, v_j, a, keep = pc.band_piece(rows, *xs)
      return _online_update(spec, carry, _scores(spec, q_R, k_j, True), a, keep, v_j, True), None

    carry = jax.lax.scan(step, carry, tuple(jnp.asarray(x) for x in steps))[0]
  return _finish(*carry)


def _sparse_bwd(pc: _Pieces, rows: np.ndarray, lse, dvec, do_R):
  """dq of the sparse rows `[B, H, Ns, C, D]` and their dk, dv `[B, H, N, C, D]` (slab and band scatter-added)."""
  spec = pc.spec
  b, h, n, c = spec.batch, spec.heads, spec.blocks, spec.block
  q_R = pc.q[:, :, rows]
  dq = jnp.zeros(q_R.shape, F32)
  dk = jnp.zeros(pc.k.shape, F32)
  dv = jnp.zeros(pc.v.shape, F32)
  g = spec.plan.global_cols
  if g.size:
    k_g, v_g, a, keep = pc.slab(rows)
    dq, dk_g, dv_g = _piece_grads(spec, _scores(spec, q_R, k_g, False), a, keep, lse, dvec, do_R, q_R, k_g, v_g,
                                  False)
    dk = dk.at[:, :, g].add(dk_g.reshape(b, h, g.size, c, -1))
    dv = dv.at[:, :, g].add(dv_g.reshape(b, h, g.size, c, -1))
  steps = _band_steps(spec.plan, spec.block)
  if steps is not None:
    r = rows.size

    def step(carry, xs):
      dq, dk, dv = carry
      idx, valid = xs
      k_j, v_j, a, keep = pc.band_piece(rows, idx, valid)
      dq_j, dk_j, dv_j = _piece_grads(spec, _scores(spec, q_R, k_j, True), a, keep, lse, dvec, do_R, q_R, k_j, v_j,
                                      True)
      s = idx.shape[-1]
      # Padding entries (invalid, block 0) add exact zeros: their weights are masked.
      dk = dk.at[:, pc.heads, idx].add(dk_j.reshape(b, h, r, s, c, -1))
      dv = dv.at[:, pc.heads, idx].add(dv_j.reshape(b, h, r, s, c, -1))
      return (dq + dq_j, dk, dv), None

    dq, dk, dv = jax.lax.scan(step, (dq, dk, dv), tuple(jnp.asarray(x) for x in steps))[0]
  del n
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------------
# The custom_vjp: residuals are the inputs, the output and one log-sum-exp per query.


def _parts(spec: _Spec):
  return [rows for rows in (spec.plan.dense_rows, spec.plan.sparse_rows) if rows.size]


def _join(spec: _Spec, parts_BxHxRxCxD) -> jax.Array:
  """Row-block parts (dense rows, sparse rows) back to `[B, H, N, C, D]` in block order."""
  order = np.concatenate(_parts(spec))
  x = jnp.concatenate(parts_BxHxRxCxD, axis=2)
  return x if np.array_equal(order, np.arange(spec.blocks)) else x[:, :, np.argsort(order)]


def _unblock(spec: _Spec, x_BxHxNxCxD) -> jax.Array:
  return jnp.transpose(x_BxHxNxCxD, (0, 2, 3, 1, 4)).reshape(spec.batch, spec.length, spec.heads, -1)


def _forward(spec: _Spec, q, k, v, kv_mask, seed):
  pc = _Pieces(spec, q, k, v, kv_mask, seed)
  outs, lses = [], []
  for rows, fwd in zip((spec.plan.dense_rows, spec.plan.sparse_rows), (_dense_fwd, _sparse_fwd)):
    if rows.size:
      o, lse = fwd(pc, rows)
      outs.append(o)
      lses.append(lse)
  return _unblock(spec, _join(spec, outs)).astype(q.dtype), tuple(lses)


def _backward(spec: _Spec, res, do_BxLxHxD):
  q, k, v, kv_mask, seed, out, lses = res
  pc = _Pieces(spec, q, k, v, kv_mask, seed)
  do_blocks = pc.blocks(do_BxLxHxD)
  # rowsum(dO ∘ O) per query (O with dropout applied: it is what dP's softmax Jacobian needs).
  dvec_BxHxNxC = jnp.einsum("bhnqd,bhnqd->bhnq", do_blocks.astype(F32), pc.blocks(out).astype(F32))
  dqs, dk, dv = [], 0.0, 0.0
  lses = iter(lses)
  for rows, bwd in zip((spec.plan.dense_rows, spec.plan.sparse_rows), (_dense_bwd, _sparse_bwd)):
    if rows.size:
      dq_r, dk_r, dv_r = bwd(pc, rows, next(lses), dvec_BxHxNxC[:, :, rows], do_blocks[:, :, rows])
      dqs.append(dq_r)
      dk, dv = dk + dk_r, dv + dv_r
  dq = _unblock(spec, _join(spec, dqs)).astype(q.dtype)
  return dq, _unblock(spec, dk).astype(k.dtype), _unblock(spec, dv).astype(v.dtype), None, None


def _attention(spec: _Spec, q, k, v, kv_mask, seed):
  @jax.custom_vjp
  def attend(q, k, v, kv_mask, seed):
    return _forward(spec, q, k, v, kv_mask, seed)[0]

  def fwd(q, k, v, kv_mask, seed):
    out, lses = _forward(spec, q, k, v, kv_mask, seed)
    return out, (q, k, v, kv_mask, seed, out, lses)

  attend.defvjp(fwd, functools.partial(_backward, spec))
  return attend(q, k, v, kv_mask, seed)


def block_sparse_attention_xla(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                               layout_HxNxN: np.ndarray, *, block_size: int, causal: bool = False,
                               scale: float | None = None, kv_mask: jax.Array | None = None,
                               dropout_rate: float = 0.0, dropout_seed: jax.Array | None = None) -> jax.Array:
  """Dense rows + global slab + gathered band under one online softmax, with a recomputing custom_vjp backward (see
  the module docstring); the same values, gradients and dropout mask as the reference."""
  b, length, h, d = q_BxLxHxD.shape
  rate = float(dropout_rate) if dropout_seed is not None and dropout_rate > 0.0 else 0.0
  spec = _Spec(plan=xla_plan(layout_HxNxN, causal), batch=b, heads=h, blocks=length // block_size, block=block_size,
               causal=bool(causal), scale=float(d ** -0.5 if scale is None else scale), rate=rate)
  seed = None if not rate else jnp.asarray(dropout_seed, jnp.int32)
  return _attention(spec, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, kv_mask, seed)


__all__ = ["block_sparse_attention_xla"]
