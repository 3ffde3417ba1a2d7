"""Mask and score functions by name: the vocabulary of the `flex` layer's `mask=` and `score=` options.

A registered function is a *factory*: called with the layer's `ModContext` and its own declared options, it returns
the function `kernels.flex.flex_attention` takes,

    mask_mod(b, h, q_idx, kv_idx) -> bool             score_mod(score, b, h, q_idx, kv_idx) -> score

(jnp functions of broadcastable integer index arrays: batch, head, query position, key position). Each declares its
options with a default and a range (the vocabulary of `attention/ranges.py`); the `flex` layer holds one field per
option name, so an option shared by several functions (`window`) means the same thing in all of them:

    @register_mask("stripes", options={"period": Option(4, Integer(1))})
    def stripes(ctx, period):
      return lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % period == 0

Functions registered from outside the package (a module named in `ATTENTION_PLUGINS`) are then selectable by name
from any config: `--config.model.attention.name=flex --config.model.attention.mask=stripes`.

Built in. Masks (positions are token indices; `causal=True` on the layer intersects any of them with `kv <= q`):
  full            every key (plain softmax attention);
  causal          `kv <= q`;
  sliding_window  keys less than `window` positions away: `|q - kv| < window`;
  dilated         every `dilation`-th key of a window of `window` such keys per side:
                  `|q - kv| < window * dilation` and `(q - kv) % dilation == 0`;
  prefix_lm       the first `prefix_length` keys bidirectionally, causal after them: `kv < prefix_length or kv <= q`;
  document        keys of the query's document: `doc[b, q] == doc[b, kv]` (data: `ctx.segment_ids_BxL`, which the layer
                  takes from its `segment_ids` argument or derives from the padding mask: every run of real tokens
                  between padding is one document);
  global_window   a sliding window plus `num_global` global tokens at the start that see and are seen by all;
  and_masks / or_masks  the intersection / union of the registered masks named in `masks` (each with the layer's
                  options), as the functions `and_masks(*mods)` / `or_masks(*mods)` do for mask functions.
Scores:
  alibi           `score - slope_h * |q - kv|` with the ALiBi paper's head slopes;
  softcap         `softcap * tanh(score / softcap)` (Gemma 2's logit soft-capping);
  relative_bias   a learned T5 relative-position bias: `score + table[bucket(kv - q), h]` with `num_buckets`
                  log-spaced buckets up to `max_distance` (bidirectional unless the layer is causal); `table` is a
                  trainable `[num_buckets, num_heads]` parameter of the layer named `relative_bias`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from attention.ranges import Integer, Range, Real, Satisfies
from kernels import flex as flex_op

MaskMod = Callable[..., jax.Array]
ScoreMod = Callable[..., jax.Array]
KINDS = ("mask", "score")


@dataclasses.dataclass(frozen=True)
class Option:
  """A function's option: its default value and its range."""

  default: Any
  range: Range


@dataclasses.dataclass(frozen=True)
class ModContext:
  """What a factory may read from the layer calling it.

  Attributes:
    num_heads: query heads (a head index `h` is in [0, num_heads)).
    causal: the layer's `causal` option (the layer intersects the mask with causality itself).
    segment_ids_BxL: int document id per token, or None (only data-dependent masks read it).
    param: `param(name, init, shape)` creates / reads a trainable float32 parameter of the layer (call it in the
      factory, not inside the returned function).
    options: the layer's value of every flex option (combinators build the masks they name with them).
  """

  num_heads: int
  causal: bool = False
  segment_ids_BxL: jax.Array | None = None
  param: Callable[[str, Callable, tuple[int, ...]], jax.Array] | None = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModSpec:
  """A registered function: `factory(ctx, **options)` returns the mask or score function.

  `data_dependent`: the mask reads `ctx.segment_ids_BxL` (data: a new function each call, its tile tables built
  inside the jitted program); other masks are built once per option values and their tables cached on the host.
  """

  name: str
  kind: str
  factory: Callable[..., Callable]
  options: Mapping[str, Option]
  data_dependent: bool = False


_REGISTRY: dict[str, dict[str, ModSpec]] = {"mask": {}, "score": {}}
# Called with each newly registered spec (the flex layer adds fields for options it did not have).
_LISTENERS: list[Callable[[ModSpec], None]] = []


def _register(kind: str, name: str, options: Mapping[str, Any] | None, data_dependent: bool):
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"a {kind} function name must be a Python identifier, got {name!r}")
  opts = {}
  for key, value in dict(options or {}).items():
    opt = value if isinstance(value, Option) else Option(*value)
    if not isinstance(opt.range, Range) or not opt.range.contains(opt.default):
      raise ValueError(f"{kind} {name!r}: option {key} needs Option(default, range) with the default in its range, "
                       f"got {value!r}")
    opts[key] = opt

  def decorator(factory: Callable[..., Callable]) -> Callable[..., Callable]:
    for key, opt in opts.items():  # one option name means one thing: the flex layer has one field per name
      other = next((s for k in KINDS for s in _REGISTRY[k].values() if key in s.options and s.name != name), None)
      if other is not None and other.options[key] != opt:
        raise ValueError(f"{kind} {name!r}: option {key}={opt} differs from {other.kind} {other.name!r}'s "
                         f"{key}={other.options[key]}; give the option another name or the same default and range")
    previous = _REGISTRY[kind].get(name)
    if previous is not None and previous.factory is not factory and \
        getattr(previous.factory, "__qualname__", None) != getattr(factory, "__qualname__", None):
      raise ValueError(f"{kind} function {name!r} is already registered by {previous.factory.__qualname__}")
    spec = ModSpec(name, kind, factory, opts, data_dependent)
    _REGISTRY[kind][name] = spec
    for listener in _LISTENERS:
      listener(spec)
    return factory

  return decorator


def register_mask(name: str, *, options: Mapping[str, Any] | None = None,
                  data_dependent: bool = False) -> Callable:
  """Decorator registering a mask factory `f(ctx, **options) -> mask_mod` under `name`; `options` maps each option
  to `Option(default, range)` (or a `(default, range)` pair)."""
  return _register("mask", name, options, data_dependent)


def register_score(name: str, *, options: Mapping[str, Any] | None = None) -> Callable:
  """Decorator registering a score factory `f(ctx, **options) -> score_mod` under `name` (see `register_mask`)."""
  return _register("score", name, options, False)


def names(kind: str = "mask") -> tuple[str, ...]:
  """The registered mask (or score) function names, sorted."""
  if kind not in KINDS:
    raise ValueError(f"unknown function kind {kind!r}; valid choices: {KINDS}")
  return tuple(sorted(_REGISTRY[kind]))


def get(kind: str, name: str) -> ModSpec:
  """The registered spec; ValueError naming the valid choices (and how plugins join) otherwise."""
  if kind not in KINDS:
    raise ValueError(f"unknown function kind {kind!r}; valid choices: {KINDS}")
  try:
    return _REGISTRY[kind][name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown flex {kind} {name!r}; valid choices: {', '.join(names(kind))} (functions defined "
                     f"outside the package join through a module named in ATTENTION_PLUGINS)") from None


def all_options() -> dict[str, Option]:
  """Every option of every registered function (one per name)."""
  return {k: o for kind in KINDS for spec in _REGISTRY[kind].values() for k, o in spec.options.items()}


def build(kind: str, name: str, ctx: ModContext, **values: Any) -> Callable:
  """The mask / score function `name` with its options taken from `values` (options of other functions are ignored,
  missing ones take their defaults), for a direct caller: a value outside its range raises one line naming the
  function and the range (for `and_masks` / `or_masks`, also the options in `ctx.options` of the masks they name).
  The flex layer calls `build_unchecked`: the gate (`attention.resolve`) checked its options when it was built."""
  spec = get(kind, name)
  kwargs = {k: values.get(k, o.default) for k, o in spec.options.items()}
  _raise_out_of_range(spec, kwargs)
  if kind == "mask" and name in COMBINATORS:
    for sub in kwargs["masks"]:
      sub_spec = get("mask", sub)
      _raise_out_of_range(sub_spec, {k: ctx.options.get(k, o.default) for k, o in sub_spec.options.items()})
  return spec.factory(ctx, **kwargs)


def build_unchecked(kind: str, name: str, ctx: ModContext, values: Mapping[str, Any]) -> Callable:
  """`build` without the range check, for values the gate checked: the flex layer's options passed
  `attention.resolve` (every function's option ranges are the layer's `option_ranges`), so its calls check nothing
  again. `name` must be registered (a lookup, `get`)."""
  spec = get(kind, name)
  return spec.factory(ctx, **{k: values.get(k, o.default) for k, o in spec.options.items()})


def _raise_out_of_range(spec: ModSpec, kwargs: Mapping[str, Any]) -> None:
  bad = [o.range.requirement(k, kwargs[k]) for k, o in spec.options.items() if not o.range.contains(kwargs[k])]
  if bad:
    raise ValueError(f"flex {spec.kind} {spec.name!r}: " + "; ".join(bad))


def check_options(kind: str, name: str, values: Mapping[str, Any]) -> None:
  """Raises if `name` is not registered or one of `values` it declares is out of range; unknown keys are named."""
  spec = get(kind, name)
  unknown = sorted(set(values) - set(spec.options))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for flex {kind} {name!r}; valid options: "
                     f"{', '.join(sorted(spec.options)) or '(none)'}")
  bad = [o.range.requirement(k, values[k]) for k, o in spec.options.items() if k in values
         and not o.range.contains(values[k])]
  if bad:
    raise ValueError(f"flex {kind} {name!r}: " + "; ".join(bad))


def _every_key(b, h, q_idx, kv_idx):
  del b, h
  return (q_idx >= 0) & (kv_idx >= 0)  # True on the broadcast grid (indices are >= 0), with no closed-over constant


# ---- combinators -----------------------------------------------------------------------------------------------------


def and_masks(*mask_mods: MaskMod) -> MaskMod:
  """The intersection of mask functions (every key allowed by all of them)."""
  if not mask_mods:
    return _every_key
  def mask_mod(b, h, q_idx, kv_idx):  # no closed-over constant: pure index masks are evaluated in-kernel (no bitmaps)
    out = mask_mods[0](b, h, q_idx, kv_idx)
    for mod in mask_mods[1:]:
      out = out & mod(b, h, q_idx, kv_idx)
    return out
  return mask_mod


def or_masks(*mask_mods: MaskMod) -> MaskMod:
  """The union of mask functions (every key allowed by one of them)."""
  if not mask_mods:
    raise ValueError("or_masks() of no mask allows no key; give at least one mask function")
  def mask_mod(b, h, q_idx, kv_idx):
    out = mask_mods[0](b, h, q_idx, kv_idx)
    for mod in mask_mods[1:]:
      out = out | mod(b, h, q_idx, kv_idx)
    return out
  return mask_mod


# ---- built-in masks --------------------------------------------------------------------------------------------------

WINDOW = Option(128, Integer(1))


@register_mask("full")
def full(ctx: ModContext) -> MaskMod:
  del ctx
  return _every_key


@register_mask("causal")
def causal(ctx: ModContext) -> MaskMod:
  del ctx
  return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx


@register_mask("sliding_window", options={"window": WINDOW})
def sliding_window(ctx: ModContext, window: int) -> MaskMod:
  del ctx
  return lambda b, h, q_idx, kv_idx: jnp.abs(q_idx - kv_idx) < window


@register_mask("dilated", options={"window": WINDOW, "dilation": Option(2, Integer(1))})
def dilated(ctx: ModContext, window: int, dilation: int) -> MaskMod:
  del ctx
  return lambda b, h, q_idx, kv_idx: ((jnp.abs(q_idx - kv_idx) < window * dilation)
                                      & (jax.lax.rem(q_idx - kv_idx, jnp.asarray(dilation, jnp.int32)) == 0))


@register_mask("prefix_lm", options={"prefix_length": Option(0, Integer(0))})
def prefix_lm(ctx: ModContext, prefix_length: int) -> MaskMod:
  del ctx
  return lambda b, h, q_idx, kv_idx: (kv_idx < prefix_length) | (kv_idx <= q_idx)


@register_mask("document", data_dependent=True)
def document(ctx: ModContext) -> MaskMod:
  if ctx.segment_ids_BxL is None:
    raise ValueError("flex mask 'document' needs per-token document ids (the layer's segment_ids argument or its "
                     "padding mask); none were given")
  doc_BxL = ctx.segment_ids_BxL
  return lambda b, h, q_idx, kv_idx: doc_BxL[b, q_idx] == doc_BxL[b, kv_idx]


@register_mask("global_window", options={"window": WINDOW, "num_global": Option(1, Integer(0))})
def global_window(ctx: ModContext, window: int, num_global: int) -> MaskMod:
  del ctx
  return lambda b, h, q_idx, kv_idx: ((jnp.abs(q_idx - kv_idx) < window) | (q_idx < num_global)
                                      | (kv_idx < num_global))


def _mask_names(value: Any) -> bool:
  return isinstance(value, (tuple, list)) and all(isinstance(n, str) and n in _REGISTRY["mask"] and
                                                  n not in ("and_masks", "or_masks") for n in value)


COMBINATORS = ("and_masks", "or_masks")  # masks built from the masks named in `masks`, with the layer's options
MASKS = Option((), Satisfies(lambda v: v == () or _mask_names(v),
                             "a tuple of registered flex mask names (not and_masks / or_masks)"))


@register_mask("and_masks", options={"masks": MASKS})
def and_masks_by_name(ctx: ModContext, masks: tuple[str, ...]) -> MaskMod:
  return and_masks(*(build_unchecked("mask", n, ctx, ctx.options) for n in masks))  # checked: `build` or the gate


@register_mask("or_masks", options={"masks": MASKS})
def or_masks_by_name(ctx: ModContext, masks: tuple[str, ...]) -> MaskMod:
  if not masks:
    raise ValueError("flex mask 'or_masks' needs masks=(name, ...): the union of no mask allows no key")
  return or_masks(*(build_unchecked("mask", n, ctx, ctx.options) for n in masks))


# ---- built-in scores -------------------------------------------------------------------------------------------------


@register_score("alibi")
def alibi(ctx: ModContext) -> ScoreMod:
  return flex_op.alibi(ctx.num_heads)  # the slopes in closed form of h: no closed-over array, so kernels take it


@register_score("softcap", options={"softcap": Option(30.0, Real(0.0, lo_open=True))})
def softcap(ctx: ModContext, softcap: float) -> ScoreMod:  # pylint: disable=redefined-outer-name
  del ctx
  return lambda score, b, h, q_idx, kv_idx: softcap * jnp.tanh(score / softcap)


def t5_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
  """T5's relative-position bucket of `kv - q` (Raffel et al., 2020): exact buckets for small distances, log-spaced
  ones up to `max_distance`, one last bucket beyond; bidirectional splits the buckets between the two directions."""
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket = jnp.where(relative_position > 0, num_buckets, 0)
    distance = jnp.abs(relative_position)
  else:
    distance = jnp.maximum(-relative_position, 0)
  max_exact = max(num_buckets // 2, 1)
  # Log-spaced after max_exact; the float is clipped before the cast so far distances do not overflow.
  ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max(max_distance / max_exact,
                                                                                             1.0 + 1e-6))
  large = max_exact + jnp.clip(ratio * (num_buckets - max_exact), 0, num_buckets).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(distance < max_exact, distance, large)


@register_score("relative_bias", options={"num_buckets": Option(32, Integer(2)),
                                          "max_distance": Option(128, Integer(1))})
def relative_bias(ctx: ModContext, num_buckets: int, max_distance: int) -> ScoreMod:
  if ctx.param is None:
    raise ValueError("flex score 'relative_bias' holds a trainable table: it needs a layer (ctx.param)")
  table_NxH = ctx.param("relative_bias", jax.nn.initializers.normal(0.02), (num_buckets, ctx.num_heads))
  bidirectional = not ctx.causal

  def score_mod(score, b, h, q_idx, kv_idx):
    bucket = t5_bucket(kv_idx - q_idx, bidirectional=bidirectional, num_buckets=num_buckets,
                       max_distance=max_distance)
    return score + table_NxH[bucket, h]
  return score_mod


__all__ = ["COMBINATORS", "ModContext", "ModSpec", "Option", "all_options", "and_masks", "build", "build_unchecked",
           "check_options", "get", "names", "or_masks", "register_mask", "register_score", "t5_bucket"]
