"""Flex attention in pure JAX: each step takes, for every (batch row, key/value head), one query tile against `C`
tiles of its key-tile list, under one online softmax; a custom_vjp backward recomputes the tiles from the saved
log-sum-exp.

The block mask's per-query-tile lists (full and partial, possibly traced) are cut in the graph into *work items* of
`C` consecutive list entries (a row of n tiles makes ceil(n / C) items), compacted so that a loop whose trip count is
the (possibly data-dependent) number of items walks only visited tiles: a causal mask costs about half of a full one,
a window mask its band. A step gathers the item's query tile `[B, Hkv, G·bq, D]` (the G query heads of a key/value
head together: each key/value tile is gathered once per group) and its key/value tiles `[B, Hkv, C·bkv, D]`, scores
them in one `G·bq x C·bkv` matmul per head, applies `score_mod` and the keys' bias (-inf for padded keys and list
slots past a row's end), masks (partial lists only: `mask_mod` on the tiles' index arrays; full lists do no mask
work), and updates that query tile's running (max, sum, weighted values) in place. Empty tiles are never touched.

Step shapes (`_step_plan`): with host tables, the block mask may be walked in taller query tiles than the kernels'
(`coarsen_q`, each fine pair keeping its verdict, so the form stays exact for any block mask) and `C` trades the
padding of each row's last item against the per-step cost (`_chunks`), both by a cost model measured on CPU (a step
costs about two tiles' work; larger matmuls run faster), within flash softmax's 512 x 512 scores per step; traced
tables keep their tiles. The arrays a step's elementwise passes read (key bias, positions, fine verdicts) are
computed one step ahead and carried by the loop (`_context`).

The backward walks the same items: `P = exp(S - lse)`, the dropout mask regenerated from the seed,
`dS = P ∘ (dP - rowsum(dO ∘ O))` pulled back through `score_mod` (its vjp on the tile, which also gives the gradient
of the arrays `score_mod` closes over, hoisted by `jax.closure_convert`: a learned bias table trains), dQ added to
the item's query tile and dK, dV scattered into its key tiles (a row lists a tile once, so the transposed lists the
kernels need are not needed here). Memory is O(L·D) plus one step's scores; no `[L, L]` buffer exists. float32
scores and statistics; matmul operands keep the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import MASK_VALUE, dropout_keep
from kernels.flex.tables import FULL, PARTIAL, BlockMask, coarsen_q

F32 = jnp.float32
# A step's shape limits (`_step_plan`), per batch row and key/value head: query rows (G·bq, host tables coarsened up
# to it), keys (C·bkv), and scores (rows x keys: flash softmax's 512 x 512 chunk, so a step's buffers never exceed
# the baseline's). Up to 1024 keys per step: measured at 8K on this CPU, 128-row tiles against 1024 keys took 0.60 s
# (bigbird) and 0.86 s (longformer) against 0.83 s and 0.98 s with 512.
_STEP_KEYS = 1024
_STEP_ROWS = 512
_STEP_ELEMENTS = 512 * 512


@dataclasses.dataclass(frozen=True)
class _Spec:
  batch: int
  heads: int  # query heads H
  kv_heads: int  # Hx: key/value heads of the computation (K/V repeated to H when the tables are per query head)
  group: int  # G = H // Hx
  q_tiles: int
  kv_tiles: int
  q_block: int
  kv_block: int
  q_len: int
  kv_len: int
  scale: float
  rate: float
  chunks: tuple  # C of the full and of the partial list: key tiles per step
  mask_mod: object  # mask_mod(b, h, q, kv, *mask_consts) at the partial list's step shapes (`explicit_mask_mod`)
  score_mods: tuple  # per list, closure-converted at its step's shapes: score_mod(s, b, h, q, kv, *params)
  factor: int = 1  # fine query tiles of the block mask per step tile (`coarsen_q`); q_block is the step tile's


def _items(num_BxHxT, idx_BxHxTxK, q_tiles: int, chunk: int):
  """Work items of one list: (query tile, offset into its list) `[B', Hx', W]`, compacted so each row of the tables
  lists its items first (W = Tq * ceil(K / chunk); unused slots point at query tile `q_tiles`, the padding tile), and
  the number of steps covering every row's items (traced when the tables are)."""
  b, h, t, k = idx_BxHxTxK.shape
  per_row = -(-k // chunk)
  n_items = (jnp.asarray(num_BxHxT, jnp.int32) + chunk - 1) // chunk  # [B', Hx', Tq]
  valid = (jnp.arange(per_row) < n_items[..., None]).reshape(b, h, t * per_row)
  pos = jnp.cumsum(valid, axis=-1) - 1
  w = t * per_row
  slot = jnp.where(valid, pos, w)  # invalid entries scatter out of bounds (dropped)
  src_q = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, per_row)).reshape(w)
  src_off = jnp.broadcast_to(jnp.arange(per_row, dtype=jnp.int32)[None, :] * chunk, (t, per_row)).reshape(w)
  at = (jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], slot)
  item_q = jnp.full((b, h, w), q_tiles, jnp.int32).at[at].set(jnp.broadcast_to(src_q, (b, h, w)), mode="drop")
  item_off = jnp.zeros((b, h, w), jnp.int32).at[at].set(jnp.broadcast_to(src_off, (b, h, w)), mode="drop")
  return item_q, item_off, valid.sum(-1).max()


def _rows(spec: _Spec, x):
  """Table `[B', Hm, ...]` -> `[B', Hx', ...]` with Hx' in {1, Hx}: row of key/value head j is j * Hm // Hx."""
  hm = x.shape[1]
  if hm in (1, spec.kv_heads):
    return x
  return x[:, (np.arange(spec.kv_heads) * hm) // spec.kv_heads]


def _tiles(spec: _Spec, s, items, chunk: int):
  """Step `s`'s tiles: query tile `[B', Hx']`, key tiles `[B', Hx', C]`, which slots are real `[B', Hx', C]`, and
  the query tile's table row (clipped)."""
  item_q, item_off, num, idx = items
  bt = jnp.arange(item_q.shape[0])[:, None]
  ht = jnp.arange(item_q.shape[1])[None, :]
  qt = item_q[:, :, s]
  slots = item_off[:, :, s][..., None] + jnp.arange(chunk, dtype=jnp.int32)
  row_q = jnp.minimum(qt, spec.q_tiles - 1)
  kt = idx[bt[..., None], ht[..., None], row_q[..., None], jnp.minimum(slots, idx.shape[-1] - 1)]
  valid = (slots < num[bt, ht, row_q][..., None]) & (qt < spec.q_tiles)[..., None]
  return qt, kt, valid, row_q


def _context(spec: _Spec, s, items, chunk: int, kbias, fine, h_rows):
  """The arrays step `s`'s elementwise passes read, each small (a row or a column of the scores):
  (key bias `[B, Hx, 1, C·bkv]`: 0, or -inf for a padded key and every key of a slot past the list's end, which
  reads the bias's extra all -inf tile `Tk`; query positions `[B, Hx, G·bq, 1]`; key positions `[B, Hx, 1, C·bkv]`;
  query heads `[1, Hx, G·bq, 1]`; the coarse pairs' fine verdicts `[B', Hx', G·bq, C·bkv]` int8 or None).

  Computed one step ahead and carried by the loop: a carried value is a buffer, whereas computed in the step XLA:CPU
  fuses these gathers and index arithmetic into every pass over the scores and repeats them per element (measured:
  the softmax's exp pass 4x slower)."""
  qt, kt, valid, row_q = _tiles(spec, s, items, chunk)
  b, hx, c = spec.batch, spec.kv_heads, chunk
  g, bq, bkv = spec.group, spec.q_block, spec.kv_block
  kt_rows = kt  # [B', Hx', C]
  qt, kt, valid = (jnp.broadcast_to(x, (b, hx) + x.shape[2:]) for x in (qt, kt, valid))
  row = jnp.arange(g * bq, dtype=jnp.int32)  # a step's rows: query head g of the group, then query q of the tile
  q_idx = (qt[..., None] * bq + row % bq)[..., None]
  kv_idx = (kt[..., None] * bkv + jnp.arange(bkv, dtype=jnp.int32)).reshape(b, hx, 1, c * bkv)
  kt_bias = jnp.where(valid, kt, spec.kv_tiles)  # [b, hx, C]
  if kbias.shape[0] == 1:
    bias = jnp.take(kbias[0], kt_bias, axis=0)
  else:
    bias = kbias[jnp.arange(b)[:, None, None], kt_bias]
  cls = None
  if fine is not None:  # coarsened tables: each fine pair's verdict, per score element
    rows = fine[jnp.arange(fine.shape[0])[:, None], jnp.arange(fine.shape[1])[None, :], row_q]  # [B', Hx', f, Tk]
    per_pair = jnp.take_along_axis(rows, jnp.broadcast_to(kt_rows[:, :, None, :], rows.shape[:3] + (c,)),
                                   axis=-1)  # [B', Hx', factor, C]
    row_fine = (row % bq) // (bq // spec.factor)
    cls = jnp.repeat(per_pair[:, :, row_fine], bkv, axis=-1)  # [B', Hx', G·bq, C·bkv]
  return bias.reshape(b, hx, 1, c * bkv), q_idx, kv_idx, h_rows, cls


def _head_rows(spec: _Spec):
  """`[1, Hx, G·bq, 1]`: the query head of each step row."""
  row = jnp.arange(spec.group * spec.q_block, dtype=jnp.int32)
  return (jnp.arange(spec.kv_heads, dtype=jnp.int32)[:, None] * spec.group + row // spec.q_block)[None, :, :, None]


class _Step:
  """One step: for every (batch row, key/value head), one query tile against `C` key tiles of its list.

  Shapes are the matmul's: queries `[B, Hx, G·bq, D]`, keys `[B, Hx, C·bkv, D]`, scores `[B, Hx, G·bq, C·bkv]` (one
  matmul per batch row and head); the index arrays handed to `mask_mod` / `score_mod` broadcast to the scores. Kept
  2-D per head so that XLA:CPU fuses the softmax's elementwise passes (a reshape between the matmul and them cost two
  extra passes over the scores). `ctx` is the step's `_context`, carried from the previous step."""

  def __init__(self, spec: _Spec, s, items, ctx, seed, chunk: int, score_mod, mask_consts=()):
    self.spec, self.seed, self.score_mod, self.mask_consts = spec, seed, score_mod, mask_consts
    b, hx, c = spec.batch, spec.kv_heads, chunk
    qt, kt, _, _ = _tiles(spec, s, items, chunk)
    self.bi, self.hi = jnp.arange(b)[:, None], jnp.arange(hx)[None, :]
    self.at_q = (self.bi, self.hi, jnp.broadcast_to(qt, (b, hx)))
    self.at_k = (self.bi[..., None], self.hi[..., None], jnp.broadcast_to(kt, (b, hx, c)))
    # Every batch row and head walks the same list (a static pattern's tables): the step's query tile is one index,
    # read and written by dynamic slices, and its key tiles one index list along the tile axis; XLA:CPU's general
    # gathers and scatters over (row, head, tile) cost several times these slices.
    self.shared = qt.shape[:2] == (1, 1)
    self.qt0, self.kt0 = qt[0, 0], kt[0, 0]
    self.b = jnp.arange(b, dtype=jnp.int32)[:, None, None, None]
    self.bias, self.q_idx, self.kv_idx, self.h, self.cls = ctx

  def get_q(self, x):
    """The step's query tiles of `x [B, Hx, Tq + 1, ...]`: `[B, Hx, ...]`."""
    if self.shared:
      return jax.lax.dynamic_index_in_dim(x, self.qt0, axis=2, keepdims=False)
    return x[self.at_q]

  def set_q(self, x, u):
    if self.shared:
      return jax.lax.dynamic_update_index_in_dim(x, u.astype(x.dtype), self.qt0, axis=2)
    return x.at[self.at_q].set(u)

  def add_q(self, x, u):
    if self.shared:
      return self.set_q(x, self.get_q(x) + u)
    return x.at[self.at_q].add(u)

  def get_k(self, x):
    """The step's keys of `x [B, Hx, Tk, bkv, D]`: `[B, Hx, C·bkv, D]`."""
    if self.shared:
      t = jnp.take(x, self.kt0, axis=2, mode="clip")
    else:
      t = x[self.at_k]
    return t.reshape(t.shape[:2] + (-1, t.shape[-1]))

  def add_k(self, x, u):
    u = u.reshape(u.shape[:2] + (-1,) + x.shape[3:])  # [B, Hx, C, bkv, D]
    if self.shared:
      return x.at[:, :, self.kt0].add(u, mode="promise_in_bounds")
    return x.at[self.at_k].add(u)

  def scores(self, raw, params, partial: bool):
    """The step's scores after `score_mod`, the key bias and (partial lists) the element mask: -inf where masked,
    so `exp(scores - m)` is exactly 0 there for any finite running max `m` (rows start at `MASK_VALUE`)."""
    sc = self.modded(raw, params) + self.bias
    allowed = self.allowed() if partial else None
    return sc if allowed is None else jnp.where(allowed, sc, -jnp.inf)

  def allowed(self):
    """A partial pair's element mask (None: none to apply)."""
    elem = None
    if self.spec.mask_mod is not None:
      elem = jnp.asarray(self.spec.mask_mod(self.b, self.h, self.q_idx, self.kv_idx, *self.mask_consts), bool)
    if self.cls is None:
      return elem
    # Each fine pair keeps its verdict inside the coarse one: EMPTY masked, FULL allowed, PARTIAL by the mask.
    by_tile = self.cls == FULL
    if elem is not None:
      by_tile = by_tile | ((self.cls == PARTIAL) & elem)
    return by_tile

  def raw_scores(self, q_t, k_t):
    return jnp.einsum("bxqd,bxkd->bxqk", q_t, k_t, preferred_element_type=F32) * self.spec.scale

  def modded(self, s, params):
    if self.score_mod is None:
      return s
    return jnp.asarray(self.score_mod(s, self.b, self.h, self.q_idx, self.kv_idx, *params), F32)

  def keep(self):
    if not self.spec.rate:
      return None
    return dropout_keep(self.seed, self.b * self.spec.heads + self.h, self.q_idx, self.kv_idx, self.spec.rate)

  def drop(self, x, keep):
    return x if keep is None else jnp.where(keep, x * (1.0 / (1.0 - self.spec.rate)), 0.0)


def _blocks_q(spec: _Spec, x_BxLxHxD):
  """`[B, Lq, H, D]` -> `[B, Hx, Tq + 1, G·bq, D]` (zero-padded to whole tiles plus one padding tile; a tile's rows
  are query head g of the group, then query q)."""
  b, length, _, d = x_BxLxHxD.shape
  tq, bq = spec.q_tiles, spec.q_block
  x = jnp.pad(x_BxLxHxD, ((0, 0), (0, (tq + 1) * bq - length), (0, 0), (0, 0)))
  x = x.reshape(b, tq + 1, bq, spec.kv_heads, spec.group, d)
  return jnp.transpose(x, (0, 3, 1, 4, 2, 5)).reshape(b, spec.kv_heads, tq + 1, spec.group * bq, d)


def _unblock_q(spec: _Spec, x):
  b, hx, t, _, d = x.shape
  g, bq = spec.group, spec.q_block
  x = x.reshape(b, hx, t, g, bq, d)
  x = jnp.transpose(x[:, :, :spec.q_tiles], (0, 2, 4, 1, 3, 5)).reshape(b, spec.q_tiles * bq, hx * g, d)
  return x[:, :spec.q_len]


def _blocks_kv(spec: _Spec, x_BxSxHxD):
  b, length, _, d = x_BxSxHxD.shape
  tk, bkv = spec.kv_tiles, spec.kv_block
  x = jnp.pad(x_BxSxHxD, ((0, 0), (0, tk * bkv - length), (0, 0), (0, 0)))
  return jnp.transpose(x.reshape(b, tk, bkv, spec.kv_heads, d), (0, 3, 1, 2, 4))  # [B, Hx, Tk, bkv, D]


def _unblock_kv(spec: _Spec, x):
  b, hx, tk, bkv, d = x.shape
  return jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, tk * bkv, hx, d)[:, :spec.kv_len]


def _key_bias(spec: _Spec, key_mask):
  """float32 `[B or 1, Tk + 1, bkv]`: 0 for a real key, -inf for a padded one (past `kv_len`, or masked by
  `key_mask`), and an extra all -inf tile `Tk` that list slots past a row's end read."""
  tk, bkv = spec.kv_tiles, spec.kv_block
  km = jnp.ones((1, spec.kv_len), bool) if key_mask is None else jnp.asarray(key_mask, bool)
  km = jnp.pad(km, ((0, 0), (0, (tk + 1) * bkv - spec.kv_len))).reshape(km.shape[0], tk + 1, bkv)
  return jnp.where(km, 0.0, -jnp.inf).astype(F32)


def _lists(spec: _Spec, tables):
  """[(items, steps, partial, chunk, score_mod)] for the full and the partial lists."""
  kv_num_full, kv_full_idx, kv_num_partial, kv_partial_idx = (_rows(spec, jnp.asarray(x, jnp.int32))
                                                              for x in tables[:4])
  out = []
  lists = ((kv_num_full, kv_full_idx, False), (kv_num_partial, kv_partial_idx, True))
  for (num, idx, partial), chunk, score_mod in zip(lists, spec.chunks, spec.score_mods):
    item_q, item_off, steps = _items(num, idx, spec.q_tiles, chunk)
    out.append(((item_q, item_off, num, idx), steps, partial, chunk, score_mod))
  return out


def _forward(spec: _Spec, tables, q, k, v, key_mask, seed, params, mask_consts):
  qb, kb, vb = _blocks_q(spec, q), _blocks_kv(spec, k), _blocks_kv(spec, v)
  kbias = _key_bias(spec, key_mask)
  fine = None if tables[4] is None else _rows(spec, tables[4])
  stat_shape = qb.shape[:-1]  # [B, Hx, Tq + 1, G·bq]
  carry = (jnp.full(stat_shape, MASK_VALUE, F32), jnp.zeros(stat_shape, F32),
           jnp.zeros(stat_shape + vb.shape[-1:], F32))
  h_rows = _head_rows(spec)
  for items, steps, partial, chunk, score_mod in _lists(spec, tables):
    context = functools.partial(_context, spec, items=items, chunk=chunk, kbias=kbias,
                                fine=fine if partial else None, h_rows=h_rows)

    def body(s, carry, items=items, partial=partial, chunk=chunk, score_mod=score_mod, context=context):
      m, l, acc, ctx = carry
      st = _Step(spec, s, items, ctx, seed, chunk, score_mod, mask_consts)
      q_t, k_t, v_t = st.get_q(qb), st.get_k(kb), st.get_k(vb)
      sc = st.scores(st.raw_scores(q_t, k_t), params, partial)
      m_old, l_old, acc_old = st.get_q(m), st.get_q(l), st.get_q(acc)
      m_new = jnp.maximum(m_old, jnp.max(sc, axis=-1))
      alpha = jnp.exp(m_old - m_new)
      # Masked entries are -inf: 0 weight, and a row that saw nothing so far (m_new = MASK_VALUE) stays at 0.
      p = jnp.exp(sc - m_new[..., None])
      pv = jnp.einsum("bxqk,bxkd->bxqd", st.drop(p, st.keep()).astype(v_t.dtype), v_t,
                      preferred_element_type=F32)
      l_new = alpha * l_old + jnp.sum(p, axis=-1)
      acc_new = alpha[..., None] * acc_old + pv
      return st.set_q(m, m_new), st.set_q(l, l_new), st.set_q(acc, acc_new), context(s + 1)

    carry = jax.lax.fori_loop(0, steps, body, carry + (context(0),))[:3]
  m, l, acc = carry
  seen = l > 0.0
  safe = jnp.where(seen, l, 1.0)
  out = jnp.where(seen[..., None], acc / safe[..., None], 0.0)
  lse = jnp.where(seen, m + jnp.log(safe), 0.0)
  return _unblock_q(spec, out).astype(q.dtype), lse


def _backward(spec: _Spec, res, do):
  q, k, v, key_mask, seed, params, tables, mask_consts, out, lse = res
  qb, kb, vb = _blocks_q(spec, q), _blocks_kv(spec, k), _blocks_kv(spec, v)
  dob = _blocks_q(spec, do)
  delta = jnp.sum(dob.astype(F32) * _blocks_q(spec, out).astype(F32), axis=-1)  # rowsum(dO ∘ O)
  kbias = _key_bias(spec, key_mask)
  fine = None if tables[4] is None else _rows(spec, tables[4])
  carry = (jnp.zeros(qb.shape, F32), jnp.zeros(kb.shape, F32), jnp.zeros(vb.shape, F32),
           tuple(jnp.zeros(jnp.shape(p), F32) for p in params))
  h_rows = _head_rows(spec)
  for items, steps, partial, chunk, score_mod in _lists(spec, tables):
    context = functools.partial(_context, spec, items=items, chunk=chunk, kbias=kbias,
                                fine=fine if partial else None, h_rows=h_rows)

    def body(s, carry, items=items, partial=partial, chunk=chunk, score_mod=score_mod, context=context):
      dq, dk, dv, dparams, ctx = carry
      st = _Step(spec, s, items, ctx, seed, chunk, score_mod, mask_consts)
      q_t, do_t, k_t, v_t = st.get_q(qb), st.get_q(dob), st.get_k(kb), st.get_k(vb)
      raw = st.raw_scores(q_t, k_t)
      sc, pull = jax.vjp(lambda raw, params: st.scores(raw, params, partial), raw, params)
      p = jnp.exp(sc - st.get_q(lse)[..., None])
      keep = st.keep()
      dv_t = jnp.einsum("bxqk,bxqd->bxkd", st.drop(p, keep).astype(do_t.dtype), do_t,
                        preferred_element_type=F32)
      dp = st.drop(jnp.einsum("bxqd,bxkd->bxqk", do_t, v_t, preferred_element_type=F32), keep)
      ds = p * (dp - st.get_q(delta)[..., None])
      ds_raw, dparams_t = pull(ds)
      ds_raw = ds_raw * spec.scale
      dq_t = jnp.einsum("bxqk,bxkd->bxqd", ds_raw.astype(k_t.dtype), k_t, preferred_element_type=F32)
      dk_t = jnp.einsum("bxqk,bxqd->bxkd", ds_raw.astype(q_t.dtype), q_t, preferred_element_type=F32)
      # A row's listed key tiles are distinct; the clipped tail of a list carries exact zeros.
      dq, dk, dv = st.add_q(dq, dq_t), st.add_k(dk, dk_t), st.add_k(dv, dv_t)
      dparams = tuple(a + jnp.asarray(g, F32) for a, g in zip(dparams, dparams_t))
      return dq, dk, dv, dparams, context(s + 1)

    carry = jax.lax.fori_loop(0, steps, body, carry + (context(0),))[:4]
  dq, dk, dv, dparams = carry
  dparams = tuple(g.astype(jnp.result_type(p)) for g, p in zip(dparams, params))
  return (_unblock_q(spec, dq).astype(q.dtype), _unblock_kv(spec, dk).astype(k.dtype),
          _unblock_kv(spec, dv).astype(v.dtype), None, None, dparams, None, None)


def _attention(spec: _Spec, tables, q, k, v, key_mask, seed, params, mask_consts):
  # Tables and the mask's closed-over arrays are explicit arguments, never closed over by the custom_vjp: traced ones
  # (a document-id mask, a top-k selection) then also stage inside `platform_dependent`'s branches.
  @jax.custom_vjp
  def attend(q, k, v, key_mask, seed, params, tables, mask_consts):
    return _forward(spec, tables, q, k, v, key_mask, seed, params, mask_consts)[0]

  def fwd(q, k, v, key_mask, seed, params, tables, mask_consts):
    out, lse = _forward(spec, tables, q, k, v, key_mask, seed, params, mask_consts)
    return out, (q, k, v, key_mask, seed, params, tables, mask_consts, out, lse)

  attend.defvjp(fwd, functools.partial(_backward, spec))
  return attend(q, k, v, key_mask, seed, params, tuple(tables), tuple(mask_consts))


# A step's fixed cost (loop, gathers, the row statistics' update) in units of one 128x128 tile's work, measured on
# this 2-core CPU (causal 4K, batch 2, 4 heads, head dim 64: 0.74 / 0.63 / 0.56 s for 128 / 256 / 512-row step tiles
# over the same tiles fit time = 0.87 ms x tiles + 1.64 ms x steps): the plan trades it against the padding of each
# row's last item and against the masked work of coarser query tiles.
_STEP_COST = 2.0


def _chunks(bm: BlockMask, most: int) -> tuple[tuple[int, int], float | None]:
  """((C of the full list, C of the partial list), cost): with concrete tables, the C <= `most` minimizing the steps'
  cost over the longest row (each row's list padded to whole items of C tiles, each tile's work counted by its area,
  plus `_STEP_COST` per step); traced tables: `most` (or the list's width when narrower), cost None."""
  out, cost = [], 0.0
  area = bm.q_block * bm.kv_block / (128 * 128)  # a step tile's work in 128x128 tiles (`_STEP_COST`'s unit)
  for num, idx in ((bm.kv_num_full, bm.kv_full_idx), (bm.kv_num_partial, bm.kv_partial_idx)):
    top = max(1, min(most, idx.shape[-1]))
    if isinstance(num, jax.core.Tracer):
      out.append(top)
      cost = None
      continue
    counts = np.asarray(num).reshape(-1, np.shape(num)[-1])  # [rows, Tq]
    steps_cost = lambda c: float((-(-counts // c) * (c * area + _STEP_COST)).sum(-1).max())  # noqa: E731
    best = min(range(1, top + 1), key=steps_cost)
    out.append(best)
    if cost is not None:
      cost += steps_cost(best)
  return (out[0], out[1]), cost


def _step_plan(bm: BlockMask, group: int):
  """(block mask to walk, its fine verdicts or None, chunks) within the step limits above (G = `group` query heads
  per key/value head): host tables are coarsened along queries (factor 1, 2, 4, ...) to the cheapest plan by
  `_chunks`' cost, so small kernel tiles do not cost a CPU step each; traced tables (a selection, a document mask)
  keep their tiles, since their union over taller tiles is unknown when the program is built."""
  def most_keys(rows: int) -> int:  # key tiles per step for step tiles of `rows` query rows
    return max(1, min(_STEP_KEYS, _STEP_ELEMENTS // (rows * group)) // bm.kv_block)

  chunks, cost = _chunks(bm, most_keys(bm.q_block))
  best = (cost, bm, None, chunks)
  if cost is None:
    return best[1:]
  factor = 2
  while factor * bm.q_block * group <= _STEP_ROWS and factor // 2 < bm.num_q_tiles:
    coarse, fine = coarsen_q(bm, factor)
    chunks, cost = _chunks(coarse, most_keys(coarse.q_block))
    if cost < best[0]:
      best = (cost, coarse, fine, chunks)
    factor *= 2
  return best[1:]


def explicit_score_mod(score_mod, example_args):
  """`(score_mod(s, b, h, q, kv, *params), params)`: the floating arrays `score_mod` closes over that may be
  differentiated, hoisted into explicit arguments (`jax.closure_convert` at the shapes it is called with), so the
  custom_vjp can return their gradients."""
  if score_mod is None:
    return None, ()
  converted, params = jax.closure_convert(score_mod, *example_args)
  return converted, tuple(params)


def explicit_mask_mod(mask_mod, example_args):
  """`(mask_mod(b, h, q, kv, *consts), consts)`: every array `mask_mod` closes over (int document ids and selections
  included, which `jax.closure_convert` leaves closed over) as explicit arguments, for calls at `example_args`'
  shapes."""
  if mask_mod is None:
    return None, ()
  closed = jax.make_jaxpr(mask_mod)(*example_args)
  if not closed.consts:
    return (lambda b, h, q, kv: mask_mod(b, h, q, kv)), ()
  jaxpr = closed.jaxpr
  return (lambda b, h, q, kv, *consts: jax.core.eval_jaxpr(jaxpr, consts, b, h, q, kv)[0]), tuple(closed.consts)


def flex_attention_xla(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, block_mask: BlockMask, *,
                       mask_mod=None, score_mod=None, key_mask=None, scale: float | None = None,
                       dropout_rate: float = 0.0, dropout_seed: jax.Array | None = None) -> jax.Array:
  """The gathered-pairs form (module docstring); `block_mask` gives the tiles and `mask_mod` (default its own) the
  element mask of partial tiles. Inputs are assumed validated by `kernels.flex.flex_attention`."""
  b, q_len, h, d = q_BxLxHxD.shape
  kv_len, hkv = k_BxSxKxD.shape[1:3]
  hm = block_mask.heads
  mask_mod = block_mask.mask_mod if mask_mod is None else mask_mod
  k, v = k_BxSxKxD, v_BxSxKxD
  if hm > hkv:  # tables per query head under GQA: each query head walks its own tiles (K/V repeated, grads summed)
    k, v = jnp.repeat(k, h // hkv, axis=2), jnp.repeat(v, h // hkv, axis=2)
    hkv = h
  fine_bq, bkv = block_mask.q_block, block_mask.kv_block
  group = h // hkv
  block_mask, fine, chunks = _step_plan(block_mask, group)
  bq = block_mask.q_block
  rate = float(dropout_rate) if dropout_seed is not None and dropout_rate > 0.0 else 0.0
  seed = jnp.asarray(dropout_seed, jnp.int32) if rate else None
  spec = _Spec(batch=b, heads=h, kv_heads=hkv, group=group, q_tiles=block_mask.num_q_tiles,
               kv_tiles=block_mask.num_kv_tiles, q_block=bq, kv_block=bkv, q_len=q_len, kv_len=kv_len,
               scale=float(d ** -0.5 if scale is None else scale), rate=rate, chunks=chunks, mask_mod=mask_mod,
               score_mods=(None, None), factor=bq // fine_bq)
  params = ()
  if score_mod is not None:
    i32 = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731

    def convert(chunk):
      examples = (jnp.zeros((b, hkv, group * bq, chunk * bkv), F32), i32(b, 1, 1, 1), i32(1, hkv, group * bq, 1),
                  i32(b, hkv, group * bq, 1), i32(b, hkv, 1, chunk * bkv))
      return explicit_score_mod(score_mod, examples)

    (fn_full, params), (fn_part, hoisted) = convert(chunks[0]), convert(chunks[1])
    if len(hoisted) != len(params) or any(a is not p for a, p in zip(hoisted, params)):
      # Both lists must see the same hoisted arrays (one gradient each): one step shape for both then.
      chunks = (max(chunks),) * 2
      (fn_full, params), fn_part = convert(chunks[0]), None
      fn_part = fn_full
    spec = dataclasses.replace(spec, chunks=chunks, score_mods=(fn_full, fn_part))
  i32 = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
  chunk = spec.chunks[1]  # the partial list's step shapes: only partial tiles evaluate the mask
  mask_fn, mask_consts = explicit_mask_mod(mask_mod, (i32(b, 1, 1, 1), i32(1, hkv, group * bq, 1),
                                                      i32(b, hkv, group * bq, 1), i32(b, hkv, 1, chunk * bkv)))
  spec = dataclasses.replace(spec, mask_mod=mask_fn)
  tables = (block_mask.kv_num_full, block_mask.kv_full_idx, block_mask.kv_num_partial, block_mask.kv_partial_idx,
            None if fine is None else jnp.asarray(fine))
  return _attention(spec, tables, q_BxLxHxD, k, v, key_mask, seed, params, mask_consts)


__all__ = ["explicit_mask_mod", "explicit_score_mod", "flex_attention_xla"]
