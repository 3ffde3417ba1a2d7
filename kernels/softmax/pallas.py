"""Softmax attention through the flex Pallas kernels (`kernels.flex`: one kernel family): full softmax is flex with no
mask, causal softmax is flex with `flex.causal`, ALiBi is a pure index `score_mod` (`flex.alibi` for the paper's
slopes), and attention dropout is the counter hash every op shares, with the same counters (batch * heads + head,
query position, key position). The block mask of a full or causal pattern is built on the host once per (length,
tiles) and cached by `kernels.flex.create_block_mask`.

`plan` decides once per call what the kernels can do (`KernelPlan`: the tiles, the host block mask, the score_mod, and
per backend the reason its kernels cannot serve the call, or None); `kernels.softmax.softmax_attention` makes the plan
in its entry and hands it to `softmax_attention_pallas`, which checks nothing again. The kernels serve self-attention
(queries and keys of one length: the dropout counters and the causal diagonal of decoding sit at `i + S - L`, which
the flex kernels do not offset), grouped-query attention as it comes (k and v with a divisor of the query heads: each
key/value head is loaded once per group), and `alibi_slopes` known when the program is traced (a numpy array, or a
concrete jax array: traced slopes cannot enter a kernel, which evaluates pure index functions). A length that is not
a multiple of the tile (LRA's CLS token makes 4K + 1) is padded by the flex driver: padded keys are masked, padded
query rows cut off, and the dropout counters of real tokens (their positions) are unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels import flex
from kernels.common import dropout_seed
from kernels.flex.pallas import flex_attention_kernel
from kernels.flex.tables import BlockMask
from kernels.flex.tables import check_supported as flex_check_supported
from kernels.platform import Backend

BACKENDS: tuple[Backend, ...] = ("tpu", "gpu")
# The smallest tile both backends take (a Mosaic GPU tile is one warpgroup's 64 wgmma rows; TPU takes any multiple of
# 8): short sequences run one such tile instead of a 128-token one.
MIN_TILE = 64


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  """What the flex kernels do for one softmax call, decided once. Hashable (a static argument of `jax.jit`): the block
  mask is fixed by (length, causal, tiles) and the score_mod is cached per slopes, so neither enters the comparison."""

  length: int
  causal: bool
  tiles: tuple[int, int]
  reasons: tuple[tuple[Backend, str | None], ...]  # (backend, why its kernels cannot serve this call or None)
  score_mod: object = dataclasses.field(default=None, compare=False, hash=False, repr=False)
  score_key: tuple = ()  # the ALiBi slopes the score_mod adds (its identity for comparison)
  block_mask: BlockMask | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

  def reason(self, backend: Backend) -> str | None:
    return dict(self.reasons)[backend]

  @property
  def mask_mod(self):
    return flex.causal if self.causal else None


def _paper_slopes(num_heads: int) -> np.ndarray:
  """The slopes `flex.alibi(num_heads)` computes inside the kernels (the ALiBi paper's), in float64."""
  lower = 2 ** int(math.floor(math.log2(num_heads)))
  h = np.arange(num_heads, dtype=np.float64)
  low = np.exp(-(h + 1.0) * (8.0 * math.log(2.0) / lower))
  high = np.exp(-(2.0 * (h - lower) + 1.0) * (8.0 * math.log(2.0) / (2 * lower)))
  return np.where(h < lower, low, high)


@functools.lru_cache(maxsize=64)
def alibi_score_mod(slopes: tuple[float, ...]):
  """A pure index score_mod adding `-slope_h * |q_idx - kv_idx|` for these constant slopes (cached, so one set of
  slopes is one function): `flex.alibi` when they are the paper's, else one select per head on Python constants."""
  if np.allclose(slopes, _paper_slopes(len(slopes)), rtol=1e-6, atol=0.0):
    return flex.alibi(len(slopes))

  def score_mod(score, b, h, q_idx, kv_idx):
    del b
    slope = jnp.full(jnp.shape(h), slopes[0], jnp.float32)
    for head, value in enumerate(slopes[1:], start=1):
      slope = jnp.where(h == head, jnp.float32(value), slope)
    return score - slope * jnp.abs(q_idx - kv_idx).astype(jnp.float32)

  return score_mod


def call_reason(q_shape, k_shape, alibi_slopes) -> str | None:
  """Why no kernel can serve the call whatever the backend (None when the shapes and the bias fit)."""
  if tuple(q_shape[:2]) != tuple(k_shape[:2]):
    return (f"queries {tuple(q_shape)} and keys {tuple(k_shape)} differ in batch or length (decoding, "
            f"cross-attention): the kernels take self-attention")
  if isinstance(alibi_slopes, jax.core.Tracer):
    return ("alibi_slopes are traced: the kernels evaluate the ALiBi bias as a pure index function of constant "
            "slopes; pass them as a numpy array (attention.positions.alibi_slopes)")
  return None


def tiles_for(q_shape, dtype) -> tuple[int, int]:
  """flex's default tiles for the call (`flex.default_tiles`), no larger than the length rounded up to `MIN_TILE`."""
  bq, bkv = flex.default_tiles(q_shape, dtype)
  cap = -(-q_shape[1] // MIN_TILE) * MIN_TILE
  return min(bq, cap), min(bkv, cap)


def plan(q_shape, k_shape, dtype, *, causal: bool, alibi_slopes) -> KernelPlan:
  """The call's `KernelPlan` (module docstring); every backend's reason is `call_reason` when that one is not None."""
  tiles = tiles_for(q_shape, dtype)
  common = call_reason(q_shape, k_shape, alibi_slopes)
  if common is not None:
    return KernelPlan(length=q_shape[1], causal=causal, tiles=tiles, reasons=tuple((b, common) for b in BACKENDS))
  length = q_shape[1]
  block_mask = flex.create_block_mask(flex.causal if causal else None, 1, 1, length, length, tiles)
  slopes = () if alibi_slopes is None else tuple(float(s) for s in np.asarray(alibi_slopes, np.float32))
  reasons = tuple((b, flex_check_supported(q_shape, k_shape, dtype, block_mask, b)) for b in BACKENDS)
  return KernelPlan(length=length, causal=causal, tiles=tiles, reasons=reasons,
                    score_mod=alibi_score_mod(slopes) if slopes else None, score_key=slopes, block_mask=block_mask)


def softmax_attention_pallas(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, kernel: KernelPlan, *,
                             key_mask: jax.Array | None, scale: float | None, dropout_rate: float,
                             dropout_rng: jax.Array | None, backend: Backend, interpret: bool) -> jax.Array:
  """Full or causal softmax (with the plan's ALiBi) through flex's Pallas driver on `backend` (`interpret`: those
  kernels in Pallas interpret mode). The plan was made for these shapes and checked each backend (`plan`); nothing is
  checked here, nor in flex's driver (`flex_attention_kernel`: no mask or the causal index one, so no bitmaps)."""
  rate = float(dropout_rate) if dropout_rng is not None else 0.0
  seed = dropout_seed(dropout_rng) if rate else None
  return flex_attention_kernel(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, kernel.block_mask, mask_mod=kernel.mask_mod,
                               bitmaps=False, score_mod=kernel.score_mod, key_mask=key_mask, scale=scale,
                               dropout_rate=rate, dropout_seed=seed, backend=backend, interpret=interpret)


__all__ = ["BACKENDS", "KernelPlan", "MIN_TILE", "alibi_score_mod", "call_reason", "plan", "softmax_attention_pallas",
           "tiles_for"]
