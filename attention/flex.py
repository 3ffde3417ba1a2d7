"""Programmable sparsity: the `flex` layer, attention whose mask and score are registered functions chosen by name.

    attention.build("flex", mask="sliding_window", window=256, score="alibi", num_heads=8)

`mask=` names a registered mask function and `score=` a score function (`attention/flex_mods.py`: the built-ins, and
functions registered from a module named in `ATTENTION_PLUGINS`); each function's options are options of this layer
(`window=`, `dilation=`, `prefix_length=`, `num_global=`, `masks=`, `softcap=`, `num_buckets=`, `max_distance=`, and a
plugin's own), held to the ranges the function declares. The common `causal=True` intersects the chosen mask with
causality. The core is `kernels.flex.flex_attention`: its block mask (`create_block_mask`, `block_size`-token tiles)
skips the tiles the mask empties, so cost follows the tiles visited. `num_kv_heads` (a divisor of `num_heads`; 1 is
multi-query attention) projects fewer key/value heads, which the core shares between query groups; the decode cache
holds `num_kv_heads` heads.

Document masks read per-token document ids: the `segment_ids` call argument (`[batch, length]` ints) when given,
else the padding mask's runs: every run of real tokens between padding is one document (`cumsum(~mask)`), so packed
sequences separated by padding do not see each other, and without a mask the whole sequence is one document.

Decoding (causal only): a flax cache of every position (a ring cache of the maximum length, as in `softmax`); each
step is one query row over the cache, the mask and score evaluated at the step's true position `t` against the cached
positions, the unwritten slots masked.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention import flex_mods
from attention import positions
from attention import registry
from attention.base import REGISTERED_AS, AttentionLayer, default_kernel_init
from attention.ranges import KV_HEADS_DIVIDE_HEADS, Integer, OneOf, Range
from kernels import sequence as sequence_lib
from kernels.flex import IMPLEMENTATIONS, flex_attention
from kernels.flex.sequence_parallel import flex_ring_attention, refusal as flex_ring_refusal


# ---- grouped-query projections (shared with the softmax layer) -----------------------------------------------------


def kv_heads(layer: AttentionLayer) -> int:
  """The layer's key/value head count: `num_kv_heads` (a divisor of `num_heads`: `KV_HEADS_DIVIDE_HEADS`, the
  gate's) or `num_heads`."""
  return layer.num_kv_heads or layer.num_heads


def project_kv(layer: AttentionLayer, x: jax.Array, name: str) -> jax.Array:
  """Projects `[B, L, F]` to `[B, L, Hkv, D]` with the shared submodule `name` ("key" / "value"), `Hkv` the layer's
  key/value heads: the projections of `AttentionLayer.project` with fewer heads."""
  kv = kv_heads(layer)
  if kv == layer.num_heads:
    return layer.project(x, name)
  y = layer.dense((kv, layer.head_dim(x)), name, axis=-1, kernel_init=default_kernel_init)(x)
  if layer.sequence_parallel_form() is None:
    y = sequence_lib.fallback_gather(y, type(layer).__name__)
  return y


def repeat_kv(k_BxSxHkvxD: jax.Array, num_heads: int) -> jax.Array:
  """Keys/values of `Hkv` heads repeated to `num_heads` (query head h reads key/value head h // (H / Hkv))."""
  groups = num_heads // k_BxSxHkvxD.shape[2]
  return k_BxSxHkvxD if groups == 1 else jnp.repeat(k_BxSxHkvxD, groups, axis=2)


def _mask_function(ctx: flex_mods.ModContext, name: str, causal: bool, values: Mapping[str, Any]) -> Callable:
  # Unchecked: the layer's mask name and every function option passed the gate (`option_ranges`, filled below from
  # the function registry, plugins' functions included) when the layer was built.
  mask_mod = flex_mods.build_unchecked("mask", name, ctx, values)
  return flex_mods.and_masks(mask_mod, flex_mods.build_unchecked("mask", "causal", ctx, {})) \
      if causal and name != "causal" else mask_mod


@functools.lru_cache(maxsize=256)
def _static_mask(name: str, causal: bool, num_heads: int, values: tuple) -> Callable:
  ctx = flex_mods.ModContext(num_heads=num_heads, causal=causal, options=dict(values))
  return _mask_function(ctx, name, causal, dict(values))


def _at_position(mask_mod, t, b, h, q_idx, kv_idx):
  """A decode row: query index 0 is position `t` (whatever index the core gives the one row)."""
  return mask_mod(b, h, q_idx * 0 + t, kv_idx)


def _score_at_position(score_mod, t, score, b, h, q_idx, kv_idx):
  return score_mod(score, b, h, q_idx * 0 + t, kv_idx)


# ---- the layer ---------------------------------------------------------------------------------------------------


def _segments_from_mask(mask_BxL: jax.Array | None, batch: int, length: int) -> jax.Array:
  """Document ids from a padding mask: each run of real tokens between padding is one document."""
  if mask_BxL is None:
    return jnp.zeros((batch, length), jnp.int32)
  return jnp.cumsum(~mask_BxL.astype(bool), axis=1, dtype=jnp.int32)


@registry.register("flex")
class FlexAttention(AttentionLayer):
  """Attention with a registered mask function (`mask`) and score function (`score`), on `kernels.flex`.

  Attributes (besides the common ones of `AttentionLayer`, and one per option of the registered functions):
    mask: a registered mask function (`attention.flex_mods.names("mask")`); "full" = every key.
    score: a registered score function (`names("score")`) or "none".
    num_kv_heads: key/value heads (a divisor of `num_heads`; None = `num_heads`, 1 = multi-query attention).
    block_size: tokens per tile of the block mask (the unit of skipped work); None = `kernels.flex.default_tiles`:
      the largest tiles every kernel backend serves for the call (128x128; 128x64 for bfloat16 at head dim 64 and
      64x64 at 128, which the Mosaic GPU dK/dV kernel's shared memory needs; a fixed 128 sent bfloat16 steps to XLA
      on cuda).
    implementation: `kernels.flex.flex_attention`'s implementation; None = best available.
  """

  mask: str = "full"
  score: str = "none"
  num_kv_heads: int | None = None
  block_size: int | None = None
  implementation: str | None = None
  # One field per option of the built-in functions (flex_mods declares their ranges; `option_ranges` merges them).
  window: int = 128
  dilation: int = 2
  prefix_length: int = 0
  num_global: int = 1
  masks: tuple = ()
  softcap: float = 30.0
  num_buckets: int = 32
  max_distance: int = 128

  supports_decode = True
  supported_positions = ("none", "rope", "alibi")
  option_ranges: ClassVar[Mapping[str, Range]] = {}  # filled from the function registry below
  option_constraints = (KV_HEADS_DIVIDE_HEADS,)

  def sequence_parallel_form(self) -> str | None:
    # Ring attention over K/V shards (`kernels/flex/sequence_parallel.py`): mask and score at global positions.
    return None if self.decode else "ring"

  def sequence_parallel_refusal(self) -> str | None:
    """Why these options cannot run sequence-sharded (read by the config checks before any data is read)."""
    return flex_ring_refusal(self.implementation)

  # ---- the functions --------------------------------------------------------------------------------------------

  def _values(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in flex_mods.all_options() if hasattr(self, k)}

  def _mask_names(self) -> tuple[str, ...]:
    return (self.mask, *self.masks) if self.mask in ("and_masks", "or_masks") else (self.mask,)

  def data_dependent(self) -> bool:
    """Whether the mask reads data (document ids): a new function per call, its tile tables built in the program."""
    return any(flex_mods.get("mask", n).data_dependent for n in self._mask_names())

  def functions(self, segment_ids_BxL: jax.Array | None) -> tuple[Callable, Callable | None]:
    """The mask function (intersected with causality when `causal`) and the score function (None for "none"),
    with the layer's ALiBi (`positions="alibi"`) added to the score."""
    values = self._values()
    if self.data_dependent():
      ctx = flex_mods.ModContext(num_heads=self.num_heads, causal=self.causal, segment_ids_BxL=segment_ids_BxL,
                                 options=values)
      mask_mod = _mask_function(ctx, self.mask, self.causal, values)
    else:  # one function object per options: its host tile tables are built once per process
      key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))
      mask_mod = _static_mask(self.mask, self.causal, self.num_heads, key)
    ctx = flex_mods.ModContext(num_heads=self.num_heads, causal=self.causal, segment_ids_BxL=segment_ids_BxL,
                               param=lambda name, init, shape: self.param(name, init, shape, jnp.float32),
                               options=values)
    mods = [flex_mods.build_unchecked("score", self.score, ctx, values)] if self.score != "none" else []
    if self.positions == "alibi":
      mods.append(flex_mods.build_unchecked("score", "alibi", ctx, {}))
    if len(mods) < 2:
      return mask_mod, (mods[0] if mods else None)

    def score_mod(score, b, h, q_idx, kv_idx):
      for mod in mods:
        score = mod(score, b, h, q_idx, kv_idx)
      return score
    return mask_mod, score_mod

  def attend(self, q, k, v, mask_mod, score_mod, key_mask, dropout_rng, *, q_offset=None):
    """The core call; a decode row (`q_offset` = its position) sees the mask and score at that position."""
    if q_offset is not None:
      t = q_offset
      mask_mod = functools.partial(_at_position, mask_mod, t)
      score_mod = None if score_mod is None else functools.partial(_score_at_position, score_mod, t)
    implementation = self.implementation
    if implementation is None and q_offset is not None:
      # A decode row (one query) is served by the XLA form: a kernel tile of one real row would be mostly padding.
      # Data-dependent masks (document ids) go through flex's dispatch: its kernels read their partial tiles as
      # bitmaps XLA evaluates from the traced ids.
      implementation = "xla"
    if q_offset is None and sequence_lib.active() is not None:
      # The length is sharded: the ring (every option of the one-device call at global positions; the explicit
      # Pallas implementations are refused there in one line).
      return flex_ring_attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod, key_mask=key_mask,
                                 dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
                                 implementation=implementation).astype(q.dtype)
    return flex_attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod, key_mask=key_mask,
                          dropout_rate=self.dropout_rate, dropout_rng=dropout_rng, implementation=implementation,
                          block_size=self.block_size)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True,
               segment_ids: jax.Array | None = None) -> jax.Array:
    self.check_inputs(x, mask)  # shapes and mask; the mask / score names and options passed the gate (no re-check)
    batch, length = x.shape[:2]
    if segment_ids is not None and tuple(segment_ids.shape) != (batch, length):
      raise ValueError(f"FlexAttention: segment_ids must be int [batch, length] = {(batch, length)}, got shape "
                       f"{tuple(segment_ids.shape)}")
    q, k, v = self.project(x, "query"), project_kv(self, x, "key"), project_kv(self, x, "value")
    if self.positions == "rope":
      offset = positions.decode_offset(self, "cached") if self.decode else 0
      q, k = positions.rope(q, offset), positions.rope(k, offset)
    dropout_rng = self.dropout_rng(deterministic)
    key_mask = None if mask is None else mask.astype(bool)

    entries = {"key": k, "value": v}
    if segment_ids is not None:
      entries["segment"] = segment_ids.astype(jnp.int32)
    step = self.ring_cache("cached", length, entries, mask) if self.decode else None
    if step is not None:
      cached, valid_BxS, t = step
      segments = cached.get("segment", jnp.cumsum(~valid_BxS, axis=1, dtype=jnp.int32))
      mask_mod, score_mod = self.functions(segments)
      y = self.attend(q, cached["key"], cached["value"], mask_mod, score_mod, valid_BxS, None, q_offset=t)
    else:
      segments = segment_ids if segment_ids is not None else _segments_from_mask(mask, batch, length)
      mask_mod, score_mod = self.functions(segments)
      y = self.attend(q, k, v, mask_mod, score_mod, key_mask, dropout_rng)
    return self.project_out(y, x.shape[-1])


# ---- options of the registered functions become the layer's ------------------------------------------------------


def _declare_ranges(cls: type) -> None:
  # The registered names are read when a value is checked: a plugin registered later is a valid choice.
  cls.option_ranges = {"mask": OneOf(lambda: flex_mods.names("mask"), what="flex mask"),
                       "score": OneOf(lambda: ("none", *flex_mods.names("score")), what="flex score"),
                       "num_kv_heads": Integer(1, allow_none=True), "block_size": Integer(1, allow_none=True),
                       "implementation": OneOf(IMPLEMENTATIONS, what="flex implementation"),
                       **{k: o.range for k, o in flex_mods.all_options().items()}}


def _add_option_fields(spec: flex_mods.ModSpec) -> None:
  """A plugin function's options that the layer lacks become fields of a subclass registered as "flex" in its place
  (so `options("flex")`, configs and the range checks see them); ranges are re-read from the registry."""
  cls = registry.get_class("flex")
  fields = {f.name for f in dataclasses.fields(cls)}
  new = {k: o for k, o in spec.options.items() if k not in fields}
  if new:
    extended = type(cls.__name__, (cls,), {"__annotations__": {k: Any for k in new},
                                           **{k: o.default for k, o in new.items()},
                                           "__module__": cls.__module__, "__doc__": cls.__doc__})
    registry._REGISTRY["flex"] = extended  # pylint: disable=protected-access  (the same variant, more fields)
    setattr(extended, REGISTERED_AS, "flex")
    cls = extended
  _declare_ranges(cls)


_declare_ranges(FlexAttention)
flex_mods._LISTENERS.append(_add_option_fields)  # pylint: disable=protected-access

__all__ = ["FlexAttention", "kv_heads", "project_kv", "repeat_kv"]
