"""The flash-style XLA form of block-sparse attention: online softmax over the allowed blocks only, and a custom_vjp
backward that recomputes the scores from the saved log-sum-exp (no score-sized residual is kept).

The layout is planned on the host into *pieces*, each a stack of tiles of `Gq` query blocks x `Gk` key blocks with a
block mask, so that every allowed (query block, key block) pair is in exactly one piece and the matmuls are as large
as the layout allows (XLA:CPU runs a batch of 32 x 64 x 32 matmuls several times slower per flop than one large one):
  dense rows   query blocks whose row is (nearly) full, e.g. global tokens (`tables.xla_plan`'s split): one tile of
               all of them against every key, walked in key chunks;
  slab         key blocks (nearly) every other row sees (global tokens): one tile of the sparse rows against them;
  window       the diagonals around the main one that most rows see (a sliding window at least `_MIN_WINDOW_KEYS`
               wide; narrower ones stay in the band): tiles of `G` consecutive query blocks against their
               `G + width - 1` contiguous key blocks;
  groups       rows (at least `_MIN_GROUP_ROWS`) whose remaining key blocks (nearly) coincide, e.g. the strided
               columns of the Sparse Transformer: one tile per group against the union of its rows' blocks;
  band         whatever is left (BigBird's random blocks): one tile per query block against its own listed blocks,
               the lists padded to the widest such row.
Tiles are gathered a step at a time (`_STEP_SCORES` scores per batch row and head at most) in a scan, so memory is
O(L·D) plus one step's scores; time is O(L·K·C + G·C·L) for K sparse blocks per row and G global blocks, as before.

All pieces of a query row share one softmax: each piece keeps a running (max, sum, weighted values) per query, and
the pieces are merged at the end; the forward keeps per query the log-sum-exp. The backward walks the same tiles
again: it recomputes scores and weights `P = exp(S - lse)`, regenerates the dropout mask from the seed
(`kernels.common.dropout_keep`: the mask of the reference and the Pallas kernels), forms
`dS = P ∘ (dP - rowsum(dO ∘ O))` (FlashAttention-2; exact with dropout, `O` being the dropped-out output), and
scatter-adds each step's key/value gradients into their blocks. Scores, softmax statistics and every accumulation are
float32 whatever the input dtype; matmul operands keep the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import MASK_VALUE, dropout_keep
from kernels.block_sparse.tables import causal_blocks, xla_plan

F32 = jnp.float32

# Scores per batch row and head in one scan step (the step's score-sized temporaries are a few times this).
_STEP_SCORES = 1 << 18
# Keys per step when a tile's keys must be chunked (dense rows; a wide band).
_MIN_STEP_KEYS = 256
# A window tile spans about this many query tokens (bigger matmuls, more wasted corners).
_WINDOW_QUERIES = 256
_MIN_WINDOW_KEYS = 256
# A group's union of key blocks may exceed its widest row by this factor.
_GROUP_SLACK = 1.25
_GROUP_QUERIES = 512
_MIN_GROUP_ROWS = 4


@dataclasses.dataclass(frozen=True)
class _Piece:
  """`P` tiles of `Gq` query blocks x `Gk` key blocks; block index N (the number of blocks) is padding.

  qidx [P, Gq]: query blocks of each tile (each real block at most once per piece);
  kidx [Hk, P, Gk]: key blocks (Hk = 1: shared by the heads, else per layout head);
  mask [Hm, P, Gq, Gk]: which pairs the piece computes (Hm = 1 or the layout's heads);
  tiles, keys: tiles and key blocks per scan step (they divide P and Gk).
  """

  name: str
  qidx: np.ndarray
  kidx: np.ndarray
  mask: np.ndarray
  tiles: int
  keys: int


def _split(total: int, most: int) -> int:
  """The step size <= `most` (>= 1) whose number of steps is the fewest, with the least padding."""
  most = max(1, min(total, most))
  steps = -(-total // most)
  return -(-total // steps)


def _pad_axis(x: np.ndarray, axis: int, size: int, value) -> np.ndarray:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return np.pad(x, pad, constant_values=value)


def _piece(name: str, qidx, kidx, mask, n: int, c: int) -> _Piece:
  """A piece with its step sizes, tiles and keys padded to whole steps."""
  p, gq = qidx.shape
  gk = kidx.shape[-1]
  per_tile = gq * c * c  # scores per key block of one tile
  if p * per_tile * gk <= _STEP_SCORES:
    tiles, keys = p, gk
  else:
    keys = _split(gk, max(_STEP_SCORES // (p * per_tile), 1))
    if keys * c < min(gk * c, _MIN_STEP_KEYS):  # too many tiles for whole key steps: step over tiles too
      keys = _split(gk, max(_MIN_STEP_KEYS // c, 1))
      tiles = _split(p, max(_STEP_SCORES // (per_tile * keys), 1))
    else:
      tiles = p
  p_pad, gk_pad = -(-p // tiles) * tiles, -(-gk // keys) * keys
  qidx = _pad_axis(qidx, 0, p_pad, n)
  kidx = _pad_axis(_pad_axis(kidx, 1, p_pad, n), 2, gk_pad, n)
  mask = _pad_axis(_pad_axis(mask, 1, p_pad, False), 3, gk_pad, False)
  return _Piece(name, qidx.astype(np.int32), kidx.astype(np.int32), mask, tiles, keys)


def _window_offsets(rest: np.ndarray, rows: np.ndarray) -> tuple[int, int] | None:
  """The widest run of diagonals `j - i` around 0 that at least half of the (head, row) pairs of `rows` see."""
  n = rest.shape[-1]
  if not rows.size:
    return None

  def coverage(delta: int) -> float:
    cols = rows + delta
    ok = (cols >= 0) & (cols < n)
    if not ok.any():
      return 0.0
    return float(rest[:, rows[ok], cols[ok]].mean())

  if coverage(0) < 0.5:
    return None
  lo = hi = 0
  while lo - 1 > -n and coverage(lo - 1) >= 0.5:
    lo -= 1
  while hi + 1 < n and coverage(hi + 1) >= 0.5:
    hi += 1
  return (lo, hi) if hi > lo else None


def _window_piece(rest: np.ndarray, rows: np.ndarray, n: int, c: int):
  """The window piece of `rest` (removed from it in place), or None."""
  offsets = _window_offsets(rest, rows)
  if offsets is None:
    return None
  lo, hi = offsets
  width = hi - lo + 1
  if width * c < _MIN_WINDOW_KEYS:  # a narrow window gains nothing over the per-row band gather
    return None
  # G consecutive query blocks see G + width - 1 key blocks: G <= width / 4 + 1 wastes at most a quarter.
  g = int(np.clip(width // 4 + 1, 1, max(1, _WINDOW_QUERIES // c)))
  t = -(-n // g)
  qidx = np.arange(t * g).reshape(t, g)
  kidx = (np.arange(t)[:, None] * g + lo + np.arange(g + width - 1)[None, :])
  q_ok, k_ok = qidx < n, (kidx >= 0) & (kidx < n)
  qidx, kidx = np.where(q_ok, qidx, n), np.where(k_ok, kidx, n)
  sparse = np.zeros(n + 1, bool)
  sparse[rows] = True
  delta = kidx[:, None, :] - qidx[:, :, None]  # [T, G, U]
  padded = np.pad(rest, ((0, 0), (0, 1), (0, 1)))
  mask = padded[:, qidx[:, :, None], kidx[:, None, :]] & (delta >= lo) & (delta <= hi) & sparse[qidx][:, :, None]
  if not mask.any():
    return None
  # Remove the window's pairs from what is left.
  h_idx, t_idx, a_idx, u_idx = np.nonzero(mask)
  rest[h_idx, qidx[t_idx, a_idx], kidx[t_idx, u_idx]] = False
  return _piece("window", qidx, kidx[None], mask, n, c)


def _group_rows(rest: np.ndarray, rows: np.ndarray, c: int) -> list[list[int]]:
  """Greedy groups of rows whose key blocks (over heads) nearly coincide: a group's union stays within
  `_GROUP_SLACK` of its widest row. Groups under `_MIN_GROUP_ROWS` rows are left to the band."""
  if not rows.size:
    return []
  pattern = rest[:, rows].transpose(1, 0, 2).reshape(rows.size, -1)  # [R, H * N]
  counts = pattern.sum(-1)
  free = counts > 0
  groups = []
  most = max(2, _GROUP_QUERIES // c)
  for i in np.argsort(-counts, kind="stable"):
    if not free[i]:
      continue
    free[i] = False
    union, widest, members = pattern[i].copy(), int(counts[i]), [i]
    while len(members) < most:
      cand = np.flatnonzero(free)
      if not cand.size:
        break
      sizes = (union | pattern[cand]).sum(-1)
      best = int(np.argmin(sizes))
      j = cand[best]
      if sizes[best] > _GROUP_SLACK * max(widest, int(counts[j])):
        break
      free[j] = False
      members.append(j)
      union |= pattern[j]
      widest = max(widest, int(counts[j]))
    if len(members) >= _MIN_GROUP_ROWS:  # smaller groups gain little over the band and cost a piece
      groups.append(sorted(int(rows[m]) for m in members))
  return groups


def _group_piece(rest: np.ndarray, rows: np.ndarray, n: int, c: int):
  groups = _group_rows(rest, rows, c)
  if not groups:
    return None
  gq = max(len(g) for g in groups)
  keys = [np.flatnonzero(rest[:, g].any(axis=(0, 1))) for g in groups]
  gk = max(k.size for k in keys)
  qidx = np.full((len(groups), gq), n)
  kidx = np.full((len(groups), gk), n)
  for p, (g, k) in enumerate(zip(groups, keys)):
    qidx[p, :len(g)], kidx[p, :k.size] = g, k
  padded = np.pad(rest, ((0, 0), (0, 1), (0, 1)))
  mask = padded[:, qidx[:, :, None], kidx[:, None, :]]
  for g in groups:
    rest[:, g] = False
  return _piece("groups", qidx, kidx[None], mask, n, c)


def _band_piece(rest: np.ndarray, n: int, c: int):
  rows = np.flatnonzero(rest.any(axis=(0, 2)))
  if not rows.size:
    return None
  sub = rest[:, rows]  # [H', R, N]
  counts = sub.sum(-1)
  width = max(int(counts.max()), 1)
  order = np.argsort(~sub, axis=-1, kind="stable")[..., :width]  # allowed blocks first, increasing
  valid = np.arange(width)[None, None, :] < counts[..., None]
  kidx = np.where(valid, order, n)
  rest[:, rows] = False
  return _piece("band", rows[:, None], kidx, valid[:, :, None, :], n, c)


@functools.lru_cache(maxsize=128)
def _plan_cached(layout_bytes: bytes, shape: tuple[int, ...], causal: bool, c: int) -> tuple[_Piece, ...]:
  layout = np.frombuffer(layout_bytes, dtype=np.bool_).reshape(shape)
  base = xla_plan(layout, causal)
  rest = causal_blocks(layout) if causal else layout.copy()
  n = rest.shape[-1]
  pieces = []
  if base.dense_rows.size:
    rows = base.dense_rows
    pieces.append(_piece("dense", rows[None], np.arange(n)[None, None], rest[:, rows][:, None], n, c))
    rest[:, rows] = False
  rows = base.sparse_rows
  g = base.global_cols
  if g.size and rows.size and rest[:, rows][:, :, g].any():
    pieces.append(_piece("slab", rows[None], g[None, None], rest[:, rows][:, :, g][:, None], n, c))
    rest[:, :, g] = False
  for make in (lambda: _window_piece(rest, rows, n, c), lambda: _group_piece(rest, rows, n, c),
               lambda: _band_piece(rest, n, c)):
    piece = make()
    if piece is not None:
      pieces.append(piece)
  assert not rest.any(), "every allowed block pair belongs to a piece"
  return tuple(pieces)


def plan_pieces(layout_HxNxN: np.ndarray, causal: bool, block_size: int) -> tuple[_Piece, ...]:
  """The pieces of a layout (cached per layout, causal flag and block size)."""
  layout = np.ascontiguousarray(layout_HxNxN, dtype=np.bool_)
  return _plan_cached(layout.tobytes(), layout.shape, bool(causal), int(block_size))


# ----------------------------------------------------------------------------------------------------------------------
# Device side. Tiles are `[B, H, Pc, Gq, C, D]` queries against `[B, H, Pc, Kc, C, D]` keys: scores
# `[B, H, Pc, Gq, C, Kc, C]` (one matmul of Gq·C x Kc·C per tile), per-query statistics `[B, H, Pc, Gq, C]`.

_S, _PV, _T = "bhpgqd,bhpkwd->bhpgqkw", "bhpgqkw,bhpkwd->bhpgqd", "bhpgqkw,bhpgqd->bhpkwd"


@dataclasses.dataclass(frozen=True)
class _Spec:
  batch: int
  heads: int
  blocks: int  # N
  block: int  # C
  causal: bool
  scale: float
  rate: float  # 0.0: no dropout


class _Call:
  """Block views of one call's inputs (with one zero padding block at index N) and the per-step tile math."""

  def __init__(self, spec: _Spec, q, k, v, key_mask, seed):
    self.spec, self.seed = spec, seed
    self.q, self.k, self.v = (self.padded_blocks(x) for x in (q, k, v))  # [B, H, N + 1, C, D]
    b, n, c = spec.batch, spec.blocks, spec.block
    self.mask = None
    if key_mask is not None:
      self.mask = jnp.pad(key_mask.astype(bool).reshape(b, n, c), ((0, 0), (0, 1), (0, 0)))  # [B, N + 1, C]
    self.heads = np.arange(spec.heads)[:, None, None]

  def blocks(self, x_BxLxHxD):  # -> [B, H, N, C, D]
    s = self.spec
    return jnp.transpose(x_BxLxHxD.reshape(s.batch, s.blocks, s.block, s.heads, x_BxLxHxD.shape[-1]), (0, 3, 1, 2, 4))

  def padded_blocks(self, x_BxLxHxD):
    return jnp.pad(self.blocks(x_BxLxHxD), ((0, 0), (0, 0), (0, 1), (0, 0), (0, 0)))

  def keys(self, kidx_HkxPcxKc):
    """Gathered keys and values `[B, H, Pc, Kc, C, D]` of one step."""
    return self.k[:, self.heads, kidx_HkxPcxKc], self.v[:, self.heads, kidx_HkxPcxKc]

  def allowed_keep(self, qidx_PcxGq, kidx_HkxPcxKc, mask_HmxPcxGqxKc):
    """Token-level allowed mask and dropout keep-mask (None without dropout), broadcastable to the scores."""
    spec, c = self.spec, self.spec.block
    q_pos = (qidx_PcxGq[:, :, None] * c + jnp.arange(c))[None, None, :, :, :, None, None]  # [1,1,Pc,Gq,C,1,1]
    k_pos = (kidx_HkxPcxKc[..., None] * c + jnp.arange(c))[None, :, :, None, None, :, :]  # [1,Hk,Pc,1,1,Kc,C]
    allowed = mask_HmxPcxGqxKc[None, :, :, :, None, :, None]
    if spec.causal:
      allowed = allowed & (k_pos <= q_pos)
    if self.mask is not None:
      allowed = allowed & self.mask[:, kidx_HkxPcxKc][:, :, :, None, None, :, :]
    keep = None
    if spec.rate:
      bh = (jnp.arange(spec.batch)[:, None] * spec.heads + jnp.arange(spec.heads)[None, :])
      keep = dropout_keep(self.seed, bh[:, :, None, None, None, None, None], q_pos, k_pos, spec.rate)
    return allowed, keep

  def scores(self, q_t, k_t):
    return jnp.einsum(_S, q_t, k_t, preferred_element_type=F32) * self.spec.scale

  def drop(self, x, keep):
    return x if keep is None else jnp.where(keep, x * (1.0 / (1.0 - self.spec.rate)), 0.0)


def _steps(piece: _Piece):
  """Scan inputs of a piece: tile steps (outer) and key steps (inner) of its tables."""
  p, gq = piece.qidx.shape
  hk, hm, gk = piece.kidx.shape[0], piece.mask.shape[0], piece.kidx.shape[-1]
  to, ko = p // piece.tiles, gk // piece.keys
  qidx = piece.qidx.reshape(to, piece.tiles, gq)
  kidx = piece.kidx.reshape(hk, to, piece.tiles, ko, piece.keys).transpose(1, 3, 0, 2, 4)  # [To, Ko, Hk, Pc, Kc]
  mask = piece.mask.reshape(hm, to, piece.tiles, gq, ko, piece.keys).transpose(1, 4, 0, 2, 3, 5)
  return jnp.asarray(qidx), jnp.asarray(kidx), jnp.asarray(mask)


def _piece_forward(call: _Call, piece: _Piece):
  """Per-query (max, sum, weighted values) of one piece, in its tile order `[B, H, P, Gq, C(, D)]`."""
  qidx, kidx, mask = _steps(piece)
  dv = call.v.shape[-1]

  def tile_step(_, xs):
    qidx_t, kidx_t, mask_t = xs
    q_t = call.q[:, :, qidx_t]  # [B, H, Pc, Gq, C, D]
    shape = q_t.shape[:5]

    def key_step(carry, ys):
      m, l, acc = carry
      kidx_s, mask_s = ys
      k_s, v_s = call.keys(kidx_s)
      allowed, keep = call.allowed_keep(qidx_t, kidx_s, mask_s)
      s = jnp.where(allowed, call.scores(q_t, k_s), MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=(-2, -1)))
      # Masked entries are zeroed by the `where`: a query that so far saw nothing (m_new = MASK_VALUE) stays at 0.
      p = jnp.where(allowed, jnp.exp(s - m_new[..., None, None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum(_PV, call.drop(p, keep).astype(v_s.dtype), v_s, preferred_element_type=F32)
      return (m_new, alpha * l + jnp.sum(p, axis=(-2, -1)), alpha[..., None] * acc + pv), None

    init = (jnp.full(shape, MASK_VALUE, F32), jnp.zeros(shape, F32), jnp.zeros(shape + (dv,), F32))
    return None, jax.lax.scan(key_step, init, (kidx_t, mask_t))[0]

  m, l, acc = jax.lax.scan(tile_step, None, (qidx, kidx, mask))[1]  # [To, B, H, Pc, Gq, C(, D)]
  tiles = lambda x: jnp.moveaxis(x, 0, 2).reshape(x.shape[1:3] + (-1,) + x.shape[4:])  # noqa: E731
  return tiles(m), tiles(l), tiles(acc)  # [B, H, P, Gq, C(, D)]


def _natural_order(piece: _Piece, n: int) -> np.ndarray:
  """For each query block, its slot in the piece's flattened tiles, or P·Gq (a padding slot) if absent."""
  flat = piece.qidx.reshape(-1)
  inv = np.full(n, flat.size, np.int32)
  real = flat < n
  inv[flat[real]] = np.flatnonzero(real)
  return inv


def _to_natural(piece: _Piece, x, fill: float, n: int):
  """`[B, H, P, Gq, C(, ...)]` in tile order -> `[B, H, N, C(, ...)]` (blocks the piece lacks get `fill`)."""
  flat = x.reshape(x.shape[:2] + (-1,) + x.shape[4:])
  flat = jnp.concatenate([flat, jnp.full(flat.shape[:2] + (1,) + flat.shape[3:], fill, flat.dtype)], axis=2)
  return flat[:, :, _natural_order(piece, n)]


def _forward(spec: _Spec, pieces, q, k, v, key_mask, seed):
  call = _Call(spec, q, k, v, key_mask, seed)
  n = spec.blocks
  parts = []
  for piece in pieces:
    m, l, acc = _piece_forward(call, piece)
    parts.append((_to_natural(piece, m, MASK_VALUE, n), _to_natural(piece, l, 0.0, n), _to_natural(piece, acc, 0.0, n)))
  m = functools.reduce(jnp.maximum, [p[0] for p in parts])
  l, acc = 0.0, 0.0
  for m_p, l_p, acc_p in parts:
    w = jnp.exp(m_p - m)
    l, acc = l + w * l_p, acc + w[..., None] * acc_p
  seen = l > 0.0
  safe = jnp.where(seen, l, 1.0)
  out = jnp.where(seen[..., None], acc / safe[..., None], 0.0)  # a query with no allowed key outputs 0
  lse = jnp.where(seen, m + jnp.log(safe), 0.0)  # [B, H, N, C]; unused where nothing is allowed
  out = jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(spec.batch, n * spec.block, spec.heads, -1)
  return out.astype(q.dtype), lse


def _piece_backward(call: _Call, piece: _Piece, lse, dvec, do, dk, dv):
  """dq of the piece's queries (natural order `[B, H, N, C, D]`); its key/value gradients added into `dk`, `dv`
  (`[B, H, N + 1, C, D]`, block N absorbing padding). `lse`, `dvec` `[B, H, N + 1, C]`, `do` `[B, H, N + 1, C, D]`."""
  qidx, kidx, mask = _steps(piece)
  spec = call.spec

  def tile_step(carry, xs):
    dk, dv = carry
    qidx_t, kidx_t, mask_t = xs
    q_t, do_t = call.q[:, :, qidx_t], do[:, :, qidx_t]  # [B, H, Pc, Gq, C, D]
    lse_t, dvec_t = lse[:, :, qidx_t][..., None, None], dvec[:, :, qidx_t][..., None, None]

    def key_step(carry, ys):
      dq, dk, dv = carry
      kidx_s, mask_s = ys
      k_s, v_s = call.keys(kidx_s)
      allowed, keep = call.allowed_keep(qidx_t, kidx_s, mask_s)
      p = jnp.where(allowed, jnp.exp(call.scores(q_t, k_s) - lse_t), 0.0)
      dv_s = jnp.einsum(_T, call.drop(p, keep).astype(do_t.dtype), do_t, preferred_element_type=F32)
      dp = call.drop(jnp.einsum(_S, do_t, v_s, preferred_element_type=F32), keep)
      ds = p * (dp - dvec_t)
      dq = dq + jnp.einsum(_PV, ds.astype(k_s.dtype), k_s, preferred_element_type=F32) * spec.scale
      dk_s = jnp.einsum(_T, ds.astype(q_t.dtype), q_t, preferred_element_type=F32) * spec.scale
      # Padding entries carry exact zeros (their weights are masked) into block N.
      dk = dk.at[:, call.heads, kidx_s].add(dk_s)
      dv = dv.at[:, call.heads, kidx_s].add(dv_s)
      return (dq, dk, dv), None

    (dq, dk, dv), _ = jax.lax.scan(key_step, (jnp.zeros(q_t.shape, F32), dk, dv), (kidx_t, mask_t))
    return (dk, dv), dq

  (dk, dv), dq = jax.lax.scan(tile_step, (dk, dv), (qidx, kidx, mask))  # dq [To, B, H, Pc, Gq, C, D]
  dq = jnp.moveaxis(dq, 0, 2).reshape(dq.shape[1:3] + (-1,) + dq.shape[4:])
  return _to_natural(piece, dq, 0.0, spec.blocks), dk, dv


def _backward(spec: _Spec, pieces, res, do_BxLxHxD):
  q, k, v, key_mask, seed, out, lse = res
  call = _Call(spec, q, k, v, key_mask, seed)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 3))  # noqa: E731  block N: zeros
  do = call.padded_blocks(do_BxLxHxD)
  # rowsum(dO ∘ O) per query (O with dropout applied: it is what the softmax Jacobian of dP needs).
  dvec = jnp.einsum("bhnqd,bhnqd->bhnq", do.astype(F32), call.padded_blocks(out).astype(F32))
  lse = pad(lse)
  dq = 0.0
  dk = jnp.zeros(call.k.shape, F32)
  dv = jnp.zeros(call.v.shape, F32)
  for piece in pieces:
    dq_p, dk, dv = _piece_backward(call, piece, lse, dvec, do, dk, dv)
    dq = dq + dq_p
  unblock = lambda x: jnp.transpose(x[:, :, :spec.blocks], (0, 2, 3, 1, 4)).reshape(  # noqa: E731
      spec.batch, spec.blocks * spec.block, spec.heads, -1)
  return (unblock(dq).astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None, None)


def _attention(spec: _Spec, pieces, q, k, v, key_mask, seed):
  @jax.custom_vjp
  def attend(q, k, v, key_mask, seed):
    return _forward(spec, pieces, q, k, v, key_mask, seed)[0]

  def fwd(q, k, v, key_mask, seed):
    out, lse = _forward(spec, pieces, q, k, v, key_mask, seed)
    return out, (q, k, v, key_mask, seed, out, lse)

  attend.defvjp(fwd, functools.partial(_backward, spec, pieces))
  return attend(q, k, v, key_mask, seed)


def block_sparse_attention_xla(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                               layout_HxNxN: np.ndarray, *, block_size: int, causal: bool = False,
                               scale: float | None = None, key_mask: jax.Array | None = None,
                               dropout_rate: float = 0.0, dropout_seed: jax.Array | None = None) -> jax.Array:
  """Tiled pieces of the layout under one online softmax, with a recomputing custom_vjp backward (see the module
  docstring); the same values, gradients and dropout mask as the reference."""
  b, length, h, d = q_BxLxHxD.shape
  rate = float(dropout_rate) if dropout_seed is not None and dropout_rate > 0.0 else 0.0
  spec = _Spec(batch=b, heads=h, blocks=length // block_size, block=block_size, causal=bool(causal),
               scale=float(d ** -0.5 if scale is None else scale), rate=rate)
  seed = None if not rate else jnp.asarray(dropout_seed, jnp.int32)
  pieces = plan_pieces(layout_HxNxN, causal, block_size)
  return _attention(spec, pieces, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, key_mask, seed)


__all__ = ["block_sparse_attention_xla", "plan_pieces"]
