"""Flex attention: softmax attention whose sparsity and score modification are functions a researcher writes.

`flex_attention(q, k, v, *, mask_mod=None, score_mod=None, block_mask=None, key_mask=None, scale=None,
dropout_rate=0.0, dropout_rng=None, implementation=None)` with q `[B, Lq, H, D]`, k and v `[B, Lk, Hkv, D]` (`Hkv`
divides `H`: grouped-query attention, key/value head `h * Hkv // H` serves query head h).
  mask_mod(b, h, q_idx, kv_idx) -> bool   and   score_mod(score, b, h, q_idx, kv_idx) -> score
are jnp functions of broadcastable int32 index arrays (score_mod sees the scaled float32 score). The block mask
(`tables.BlockMask`, from `create_block_mask` on the host or built in the traced program) says which tiles are empty
(never visited), full (no mask work) or partial (mask_mod applied inside the tile); without one it is made here
from mask_mod (host tables, cached, when mask_mod closes over no traced value; traced tables when it closes over
traced data such as per-example document ids). In the kernels' partial tiles a pure index mask_mod is evaluated
in-kernel (no memory); one closing over arrays (host or traced: document ids, a top-k selection, a prefix length) is
evaluated by XLA on the partial tiles' index grids and read by the kernels as bfloat16 tile bitmaps
(`tables.partial_bitmaps`: 2 bytes x q_block x kv_block per slot of the partial lists; the plan logs their size). `key_mask` bool `[B, Lk]` (True = a real key) masks padding; a query
with no allowed key outputs 0 with finite gradients. Dropout (`dropout_rate` with `dropout_rng`) drops normalized
weights by the counter hash every op shares (`kernels.common.dropout_keep`, counters b * H + h, q_idx, kv_idx).

Implementations (the op template):
  "reference"  dense `[B, H, Lq, Lk]` scores (`reference`): the ground truth;
  "xla"        the visited tile pairs gathered a step at a time, online softmax, recomputing custom_vjp (`xla`);
  "pallas"     the Pallas kernels of the platform the program is lowered for (`pallas`: `pallas_tpu` with the
               tables scalar-prefetched, `pallas_gpu` (Mosaic GPU, Hopper) reading them from global memory);
               never falls back: a call they cannot serve raises;
  "interpret"  the TPU kernels in Pallas interpret mode (CPU tests);
  None         the kernels where the program is lowered for a platform they serve, "xla" otherwise (CPU), with one
               logged line naming why a kernel could not serve (a score_mod closing over arrays, e.g. a trainable
               bias table: the kernels do not accumulate its gradient; the XLA form does).
Each call is planned once (`plan`): tiles, tables, the backend or the reason none serves it; the plan is logged once.
The kernel driver it hands the plan to (`pallas.flex_attention_kernel`) checks nothing again.

Built-in score functions (`alibi`, `softcap`, `relative_position_bias`, with `t5_bucket`) live here too.

Sequence-parallel form: `sequence_parallel.flex_ring_attention` (a ring over K/V shards, the functions and dropout
counters at global positions, the XLA form per hop; the `flex` layer takes it under `mesh.sequence > 1`).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels import platform
from kernels.common import dropout_seed
from kernels.flex.reference import flex_attention_reference
from kernels.flex.pallas import flex_attention_kernel, kernel_tables
from kernels.flex.tables import (BlockMask, bitmap_bytes, block_mask_from_indices, check_supported,
                                 create_block_mask, create_block_mask_traced, tile_sizes)
from kernels.flex.xla import flex_attention_xla

IMPLEMENTATIONS = ("reference", "xla", "pallas", "interpret", None)
OP = "flex_attention"
# Default tiles, largest first: the first pair both kernel backends can serve for the call (the platform is known only
# when the program is lowered, and the tables are built before): 128x128 on TPU, but the Mosaic GPU dK/dV kernel's
# shared memory takes 128x64 at head_dim 64 and 64x64 at 128.
DEFAULT_BLOCKS = ((128, 128), (128, 64), (64, 64))

logger = logging.getLogger("kernels")
_logged_plans: set = set()


# ----------------------------------------------------------------------------------------------------------------------
# Built-in score functions.


def alibi(num_heads: int):
  """ALiBi (Press et al.): `score - slope_h * |q_idx - kv_idx|` with the paper's slopes (`2^(-8 (h+1) / n)` for a
  power-of-two n, else the next lower power's slopes then every other one of the next higher: the slopes of
  `attention.positions.alibi_slopes`), computed from h in closed form, so the kernels take it (no closed-over
  array)."""
  if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
    raise ValueError(f"alibi: num_heads must be a positive int, got {num_heads!r}")
  lower = 2 ** int(math.floor(math.log2(num_heads)))
  ln2 = math.log(2.0)

  def score_mod(score, b, h, q_idx, kv_idx):
    hf = jnp.asarray(h).astype(jnp.float32)
    low = jnp.exp(-(hf + 1.0) * (8.0 * ln2 / lower))
    high = jnp.exp(-(2.0 * (hf - lower) + 1.0) * (8.0 * ln2 / (2 * lower)))
    slope = jnp.where(hf < lower, low, high)
    dist = jnp.abs(jnp.asarray(q_idx) - jnp.asarray(kv_idx)).astype(jnp.float32)
    return score - slope * dist

  return score_mod


def softcap(cap: float):
  """tanh soft-capping (Gemma 2, Grok): `cap * tanh(score / cap)`."""
  if not cap > 0:
    raise ValueError(f"softcap: cap must be > 0, got {cap!r}")
  cap = float(cap)
  return lambda score, b, h, q_idx, kv_idx: cap * jnp.tanh(score / cap)


def t5_bucket(relative_position, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128):
  """T5's relative-position buckets of `kv_idx - q_idx` (int32, in [0, num_buckets)): exact for small distances,
  logarithmic up to `max_distance`, the sign in the upper half when bidirectional."""
  n = -jnp.asarray(relative_position, jnp.int32)
  ret = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(nf / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(n < max_exact, n, large)


def relative_position_bias(table_NxH: jax.Array, *, bidirectional: bool = True, max_distance: int = 128):
  """T5's learned relative-position bias: `score + table[t5_bucket(kv_idx - q_idx), h]`; `table` float
  `[num_buckets, heads]` is a parameter: its gradient flows (through the XLA form, which accumulates it)."""
  table = jnp.asarray(table_NxH)
  if table.ndim != 2:
    raise ValueError(f"relative_position_bias: table must be [num_buckets, heads], got shape {table.shape}")
  num_buckets = table.shape[0]

  def score_mod(score, b, h, q_idx, kv_idx):
    bucket = t5_bucket(jnp.asarray(kv_idx) - jnp.asarray(q_idx), bidirectional=bidirectional,
                       num_buckets=num_buckets, max_distance=max_distance)
    return score + table[bucket, jnp.asarray(h)].astype(score.dtype)

  return score_mod


def causal(b, h, q_idx, kv_idx):
  """The causal mask: key position <= query position."""
  return kv_idx <= q_idx


# ----------------------------------------------------------------------------------------------------------------------
# Planning.


def closes_over_arrays(fn, *example_args) -> tuple[bool, bool]:
  """(closes over any array, closes over a traced value) for `fn` traced at `example_args`."""
  if fn is None:
    return False, False
  consts = jax.make_jaxpr(fn)(*example_args).consts
  return bool(consts), any(isinstance(c, jax.core.Tracer) for c in consts)


def _index_examples(with_score: bool):
  i32 = jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.int32)
  return ((jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32),) if with_score else ()) + (i32,) * 4


@dataclasses.dataclass(frozen=True)
class Plan:
  """One call's plan: the block mask, the implementation that runs and, for None, why each kernel cannot serve."""

  block_mask: BlockMask
  mask_mod: object
  kernel_reasons: dict  # backend -> reason string, or None when the kernel can serve
  # What the kernels read (`kernels.flex.pallas.kernel_tables`, checked per backend above): their tables, the mask they
  # evaluate (a stand-in where no tile is partial) and whether its partial tiles come as bitmaps.
  kernel_block_mask: BlockMask
  kernel_mask_mod: object
  bitmaps: bool

  def describe(self) -> str:
    bm = self.block_mask
    try:
      tiles = f"{bm.visited_fraction():.1%} of tiles visited, {bm.partial_fraction():.0%} of them partial"
    except Exception:  # noqa: BLE001  (traced tables: counts known only when the program runs)
      tiles = "traced tables"
    kernels = "; ".join(f"{b}: {'kernel' if r is None else r}" for b, r in self.kernel_reasons.items())
    bits = ""
    if self.bitmaps:
      bits = (f", partial-tile bitmaps {bitmap_bytes(self.kernel_block_mask) / 2**20:.1f} MiB (mask_mod closes over "
              f"arrays)")
    return f"{OP}: tiles {bm.q_block}x{bm.kv_block}, {tiles}{bits}; {kernels}"


def _kernel_mask(mask_mod, bm: BlockMask):
  """The mask the kernels take: `mask_mod`, or a pure index stand-in when it closes over arrays but the tables list
  no partial tile (the kernels never evaluate it then, so they need no bitmaps)."""
  if closes_over_arrays(mask_mod, *_index_examples(False))[0] and _without_partial_tiles(bm):
    return _every_key
  return mask_mod


def _kernel_reasons(q, k, score_mod, kernel_bm: BlockMask, bitmaps: bool) -> dict:
  """Each backend's reason its kernels cannot serve the call (None: they can): the one check of a flex kernel call
  (`tables.check_supported` on the tables the kernels read); the driver (`flex_attention_kernel`) does not repeat it."""
  reasons = {}
  score_arrays, _ = closes_over_arrays(score_mod, *_index_examples(True))
  common = None
  if score_arrays:
    common = ("score_mod closes over arrays (e.g. a learned bias table): the kernels evaluate pure index score "
              "functions and cannot accumulate those arrays' gradients")
  for backend in ("tpu", "gpu"):
    reasons[backend] = common or check_supported(q.shape, k.shape, q.dtype, kernel_bm, backend, bitmaps)
  return reasons


def _without_partial_tiles(bm: BlockMask) -> bool:
  """Concrete tables with no partial tile: the kernels never evaluate the mask (full tiles need no mask work), so a
  mask closing over a constant table (BigBird's random blocks at tiles of its block size) is no obstacle."""
  try:
    return not np.asarray(bm.kv_num_partial).any()
  except Exception:  # noqa: BLE001  (traced tables: unknown until the program runs)
    return False


def _every_key(b, h, q_idx, kv_idx):
  """Stands in for a mask the kernels never evaluate (no partial tiles): a pure index function they can trace."""
  del b, h
  return jnp.full(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)), True)


def _check(q, k, v, key_mask, block_mask, implementation, dropout_rate) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {OP} implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, length, heads, head_dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
  b, lq, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k must match q in batch and head_dim: k {k.shape} vs q {q.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must match k in batch, keys and heads: v {v.shape} vs k {k.shape}")
  if h % k.shape[2]:
    raise ValueError(f"key/value heads {k.shape[2]} must divide the query heads {h} (grouped-query attention)")
  if key_mask is not None and tuple(key_mask.shape) != (b, k.shape[1]):
    raise ValueError(f"key_mask must be bool [batch, keys] = {(b, k.shape[1])}, got shape {tuple(key_mask.shape)}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate=}")
  if block_mask is not None:
    if not isinstance(block_mask, BlockMask):
      raise ValueError(f"block_mask must be a kernels.flex.BlockMask, got {type(block_mask).__name__}")
    if (block_mask.q_len, block_mask.kv_len) != (lq, k.shape[1]):
      raise ValueError(f"block_mask was made for q_len={block_mask.q_len}, kv_len={block_mask.kv_len}; the call has "
                       f"{lq} queries and {k.shape[1]} keys")
    if block_mask.batch not in (1, b):
      raise ValueError(f"block_mask batch {block_mask.batch} must be 1 or the batch {b}")
    if block_mask.heads not in (1, k.shape[2], h):
      raise ValueError(f"block_mask heads {block_mask.heads} must be 1, the key/value heads {k.shape[2]} or the "
                       f"query heads {h}")


def default_tiles(q_shape, dtype, bitmaps: bool = False) -> tuple[int, int]:
  """The first of `DEFAULT_BLOCKS` that the TPU kernels and (for the dtypes they take) the GPU kernels both serve
  (`bitmaps`: with partial-tile bitmaps in shared memory)."""
  from kernels.flex.tables import gpu_reason  # noqa: PLC0415
  from kernels.platform import mosaic_gpu_dtype_reason  # noqa: PLC0415
  gpu_dtype = mosaic_gpu_dtype_reason(dtype) is None
  for bq, bkv in DEFAULT_BLOCKS:
    if not gpu_dtype or gpu_reason(bq, bkv, q_shape[-1], dtype, bitmaps) is None:
      return bq, bkv
  return DEFAULT_BLOCKS[-1]


def plan(q, k, v, *, mask_mod=None, score_mod=None, block_mask=None, key_mask=None, block_size=None) -> Plan:
  """The call's plan (see the module docstring); logged once per distinct description."""
  b, lq, h, _ = q.shape
  lk = k.shape[1]
  if block_mask is None:
    arrays, traced = closes_over_arrays(mask_mod, *_index_examples(False))
    tiles = tile_sizes(block_size) if block_size is not None else default_tiles(q.shape, q.dtype, arrays)
    builder = create_block_mask_traced if traced else create_block_mask
    block_mask = builder(mask_mod, b, h, lq, lk, tiles)
  elif block_size is not None and tile_sizes(block_size) != (block_mask.q_block, block_mask.kv_block):
    raise ValueError(f"block_size={block_size} disagrees with the block_mask's tiles "
                     f"({block_mask.q_block}, {block_mask.kv_block}); pass one of them")
  mask_mod = block_mask.mask_mod if mask_mod is None else mask_mod
  kernel_mask = _kernel_mask(mask_mod, block_mask)
  kernel_bm, bitmaps = kernel_tables(block_mask, kernel_mask, b, h)
  result = Plan(block_mask=block_mask, mask_mod=mask_mod,
                kernel_reasons=_kernel_reasons(q, k, score_mod, kernel_bm, bitmaps), kernel_block_mask=kernel_bm,
                kernel_mask_mod=kernel_mask, bitmaps=bitmaps)
  text = result.describe()
  if text not in _logged_plans:
    _logged_plans.add(text)
    logger.info("%s", text)
  return result


def flex_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask_mod=None, score_mod=None,
                   block_mask: BlockMask | None = None, key_mask: jax.Array | None = None, scale: float | None = None,
                   dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                   implementation: str | None = None, block_size=None) -> jax.Array:
  """Flex attention (module docstring). `block_size` (int or (q_block, kv_block)) sets the tiles when no
  `block_mask` is given (default `default_tiles`: 128x128, smaller where the GPU kernels need it)."""
  _check(q, k, v, key_mask, block_mask, implementation, dropout_rate)
  p = plan(q, k, v, mask_mod=mask_mod, score_mod=score_mod, block_mask=block_mask, key_mask=key_mask,
           block_size=block_size)
  rate = float(dropout_rate) if dropout_rng is not None else 0.0
  seed = dropout_seed(dropout_rng) if rate else None
  common = dict(mask_mod=p.mask_mod, score_mod=score_mod, key_mask=key_mask, scale=scale, dropout_rate=rate,
                dropout_seed=seed)

  if implementation == "reference":
    return flex_attention_reference(q, k, v, block_mask=p.block_mask, **common)

  def xla():
    return flex_attention_xla(q, k, v, p.block_mask, **common)

  def kernel(backend, interpret):  # the plan checked this backend (`_kernel_reasons`): the driver checks nothing
    kernel_common = {**common, "mask_mod": p.kernel_mask_mod}
    return lambda: flex_attention_kernel(q, k, v, p.kernel_block_mask, bitmaps=p.bitmaps, backend=backend,
                                         interpret=interpret, **kernel_common)

  if implementation == "xla":
    return xla()
  if implementation == "interpret":
    reason = p.kernel_reasons["tpu"]
    if reason is not None and "closes over" in reason:
      raise ValueError(f"{OP}: implementation='interpret' cannot serve this call: {reason}")
    return kernel("tpu", True)()
  kernels = {backend: (kernel(backend, False) if reason is None else reason)
             for backend, reason in p.kernel_reasons.items()}
  if implementation == "pallas":
    return platform.require_kernel(OP, kernels=kernels)
  if all(isinstance(x, str) for x in kernels.values()):
    # No kernel anywhere: the XLA form runs outside `platform_dependent`, whose branches cannot hold a custom_vjp
    # closing over traced values (a document-id mask inside the step); only the notes are staged there, so each
    # accelerator's reason is still logged once where the program is lowered for it.
    platform.dispatch(OP, xla=lambda: jnp.zeros((), jnp.int32), kernels=kernels)
    return xla()
  return platform.dispatch(OP, xla=xla, kernels=kernels)


__all__ = ["BlockMask", "DEFAULT_BLOCKS", "default_tiles", "IMPLEMENTATIONS", "OP", "Plan", "alibi", "block_mask_from_indices", "causal",
           "closes_over_arrays", "create_block_mask", "create_block_mask_traced", "flex_attention",
           "flex_attention_reference", "flex_attention_xla", "plan", "relative_position_bias", "softcap",
           "t5_bucket"]
