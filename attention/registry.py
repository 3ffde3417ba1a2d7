"""Registry of attention variants and the one gate for their options: `register`, `names`, `get_class`, `options`,
`option_ranges`, `resolve`, `build`.

Variants register themselves with a decorator so that adding one never touches a dispatch ladder:

    @attention.register("performer")
    class Performer(AttentionLayer): ...

The gate: `resolve(name, num_layers, user_options)` decides a model's per-layer options once (registry defaults, then
the variant's per-layer schedule for the options the user did not set, then the user's, which always win, then
per-layer overrides), checks every given value once against the ranges the variant declares beside its fields
(attention/ranges.py; an option without one is held to its default's type) and returns frozen `AttentionSpec`s.
`AttentionSpec.build(**model_owned)` makes the layer: it checks only the model-owned options (heads, widths, causal,
dropout, decode, dtype, positions: known when the model is built) and the questions they raise (can this spec be
causal? decode?), never the spec's own options again. `build(name, **options)` (a user building one layer) passes
through the same gate once: `resolve` for the variant's options, then `AttentionSpec.build`. The layers check only
what a call knows (shapes, masks). Config validation (lra/training/config_checks.py) formats the gate's problems
(`OptionError.problems`) instead of checking again.

Dependency direction: registry -> base (the common fields and the questions a class answers); base never imports
the registry.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import flax.linen as nn

from attention import positions as positions_lib
from attention import ranges as ranges_lib
from attention.base import COMMON_RANGES, REGISTERED_AS, encoder_owned_options, registered_name  # noqa: F401
from attention.ranges import Range

_REGISTRY: dict[str, type[nn.Module]] = {}

# Flax's own dataclass fields, accepted by `build` but not reported as options.
_FLAX_FIELDS = ("parent", "name")

M = TypeVar("M", bound=type[nn.Module])


def register(name: str) -> Callable[[M], M]:
  """Class decorator that registers a Flax attention module (linen, or nnx through attention/nnx_bridge.py) under
  `name`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"attention name must be a non-empty string, got {name!r}")

  def decorator(cls: M) -> M:
    variant = cls
    if isinstance(cls, type) and "flax.nnx" in sys.modules and issubclass(cls, sys.modules["flax.nnx"].Module):
      # An NNX class (whose module imported flax.nnx) is registered as the linen layer that runs it; the decorator
      # returns the NNX class unchanged.
      from attention import nnx_bridge  # pylint: disable=import-outside-toplevel  (flax.nnx only where used)
      variant = nnx_bridge.linen_variant(cls, name)
    if not (isinstance(variant, type) and issubclass(variant, nn.Module)):
      raise TypeError(f"@register({name!r}) expects a flax.linen.Module or flax.nnx.Module subclass, got {cls!r}")
    if name in _REGISTRY and _REGISTRY[name] is not variant:
      raise ValueError(f"attention variant {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = variant
    setattr(variant, REGISTERED_AS, name)  # read by `attention.base.registered_name` (base imports no registry)
    return cls

  return decorator


def names() -> tuple[str, ...]:
  """All registered variant names, sorted."""
  return tuple(sorted(_REGISTRY))


def get_class(name: str) -> type[nn.Module]:
  """The module class registered under `name`; ValueError naming the valid choices otherwise."""
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown attention variant {name!r}; valid choices: {', '.join(names())} (a variant defined "
                     f"outside the package is registered by naming its module in ATTENTION_PLUGINS)") from None


def options(name: str, /) -> dict[str, Any]:
  """The options `build(name, ...)` accepts, with their default values (MISSING if required)."""
  cls = get_class(name)
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in _FLAX_FIELDS or not f.init:
      continue
    if f.default is not dataclasses.MISSING:
      out[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = f.default_factory()
    else:
      out[f.name] = dataclasses.MISSING
  return out


def option_ranges(name: str, /) -> dict[str, Range]:
  """The declared range of each option of variant `name`: its classes' `option_ranges` tables, base classes first
  (so a subclass adds to or narrows its base's). Options without a declared range are absent."""
  return ranges_lib.declared(get_class(name))


def _checked_ranges(name: str) -> dict[str, Range]:
  """What the gate holds each option to: the declared range, else the type of the option's default."""
  declared = option_ranges(name)
  out = {}
  for key, default in options(name).items():
    rng = declared.get(key) or ranges_lib.like_default(default)
    if rng is not None:
      out[key] = rng
  return out


def out_of_range(name: str, values: Mapping[str, Any], /) -> list[tuple[str, Any, Range]]:
  """`(option, value, range)` for every value in `values` outside the range the gate holds its option to."""
  ranges = _checked_ranges(name)
  return [(k, v, ranges[k]) for k, v in values.items() if k in ranges and not ranges[k].contains(v)]


# ---- the gate's answer -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Problem:
  """One thing the gate refused: `where` the user wrote it ("" = the attention config, "layer_options[i]"),
  the option, its value, the `kind` ("owned", "unknown", "range") and what was `expected`."""

  where: str
  option: str
  value: Any
  kind: str
  expected: str


class OptionError(ValueError):
  """The gate's refusal: one line (as ValueError) plus the structured `problems`, which the config validation
  formats with its own key paths."""

  def __init__(self, message: str, problems: Sequence[Problem] = ()):
    super().__init__(message)
    self.problems = tuple(problems)


def _freeze(value: Any) -> Any:
  """Lists (from JSON / ConfigDict) as tuples, so a spec is hashable and compares equal whatever made it."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


class AttentionSpec(collections.abc.Mapping):
  """One layer's attention as the gate decided it: the variant (`name`, `cls`) and every option of its own (a
  read-only mapping, equal to the dict of those options). Frozen and hashable, so Flax modules hold it as a field.

  The model-owned options (`encoder_owned_options()`) are not part of it: the model gives them to `build`."""

  __slots__ = ("name", "cls", "_items")

  def __init__(self, name: str, cls: type, opts: Mapping[str, Any]):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "cls", cls)
    object.__setattr__(self, "_items", tuple(sorted((k, _freeze(v)) for k, v in opts.items())))

  def __setattr__(self, key, value):
    raise dataclasses.FrozenInstanceError(f"AttentionSpec is frozen; cannot set {key}")

  def __getitem__(self, key: str) -> Any:
    for k, v in self._items:
      if k == key:
        return v
    raise KeyError(key)

  def __iter__(self) -> Iterator[str]:
    return (k for k, _ in self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash((self.name, self._items))

  def __eq__(self, other: Any) -> bool:
    if isinstance(other, AttentionSpec):
      return (self.name, self.cls, self._items) == (other.name, other.cls, other._items)
    return isinstance(other, Mapping) and dict(self) == dict(other)

  def __repr__(self) -> str:
    return f"AttentionSpec({self.name!r}, {dict(self)!r})"

  def record(self) -> dict[str, Any]:
    """`{"name": ..., **options}`: what config.json's `model.resolved_attention` holds for this layer."""
    return {"name": self.name, **self}

  def causal_refusal(self) -> str | None:
    """Why a layer of this spec cannot be causal (None: it can). A question of the options, not only of the class:
    Longformer is causal exactly when it has no global blocks."""
    return self.cls.causal_refusal(self)

  @property
  def can_be_causal(self) -> bool:
    return self.causal_refusal() is None

  @property
  def supported_positions(self) -> tuple[str, ...]:
    """The relative positions (`AttentionLayer.positions`) a layer of this spec applies."""
    return self.cls.positions_for(self)

  @property
  def can_decode(self) -> bool:
    return bool(self.cls.supports_decode)

  def build(self, **model_owned: Any) -> nn.Module:
    """The layer of this spec with the model-owned options and Flax's `name=` / `parent=`. Checks only those (their
    ranges, and causal / decode / positions against what the spec answers): the spec's own options passed the gate
    when it was made."""
    check_model_owned(self, model_owned)
    return self.cls(**self, **model_owned)


def check_model_owned(spec: AttentionSpec, model_owned: Mapping[str, Any]) -> None:
  """The gate for the options the model sets on every layer; one-line ValueErrors naming value and fix."""
  cls, owned = spec.cls, encoder_owned_options()
  not_owned = sorted(k for k in model_owned if k not in owned and k not in _FLAX_FIELDS)
  if not_owned:
    raise ValueError(f"{not_owned} are not model-owned options (model-owned: {', '.join(owned)}); put variant "
                     f"options in the attention config")
  values = {**{k: v for k, v in options(spec.name).items() if k in owned}, **model_owned}
  label = cls.__name__
  if values["decode"] and not spec.can_decode:
    raise ValueError(f"{label} has no decode path (decode=True was given); use a variant that supports decoding")
  refusal = spec.causal_refusal()
  if values["causal"] and refusal is not None:
    raise ValueError(f"{label} cannot be causal (causal=True was given): {refusal}")
  if values["decode"] and not values["causal"]:
    raise ValueError(f"{label}: decode=True requires causal=True")
  bad = [(k, v, COMMON_RANGES[k]) for k, v in model_owned.items()
         if k in COMMON_RANGES and k != "positions" and not COMMON_RANGES[k].contains(v)]
  if bad:
    raise ValueError(f"{label} (attention {spec.name!r}): " + "; ".join(r.requirement(k, v) for k, v, r in bad))
  positions_lib.check_positions(spec.name, values["positions"], spec.supported_positions)


# ---- resolution ----------------------------------------------------------------------------------------------------

def _given_problems(name: str, given: Mapping[str, Any], where: str) -> list[Problem]:
  """Problems of the options the user wrote at `where`: model-owned, unknown, or outside their range."""
  owned = encoder_owned_options()
  defaults = options(name)
  ranges = _checked_ranges(name)
  valid = ", ".join(sorted(k for k in defaults if k not in owned))
  problems = []
  for key in sorted(given):
    value = given[key]
    if key in owned:
      problems.append(Problem(where, key, value, "owned", ", ".join(owned)))
    elif key not in defaults:
      problems.append(Problem(where, key, value, "unknown", valid))
    elif key in ranges and not ranges[key].contains(value):
      problems.append(Problem(where, key, value, "range", ranges[key].describe()))
  return problems


def _raise(name: str, problems: list[Problem]) -> None:
  """One line naming every problem, grouped as the messages users know."""
  cls = get_class(name)
  parts = []
  for where in dict.fromkeys(p.where for p in problems):
    at = where or "the attention config"
    owned = sorted(p.option for p in problems if p.where == where and p.kind == "owned")
    unknown = sorted(p.option for p in problems if p.where == where and p.kind == "unknown")
    if owned:
      parts.append(f"attention option(s) {owned} in {at} are set by the model (model-owned: "
                   f"{', '.join(encoder_owned_options())}); remove them there and set them on the model instead")
    if unknown:
      expected = next(p.expected for p in problems if p.kind == "unknown")
      parts.append(f"unknown option(s) {unknown} in {at} for attention variant {name!r}; valid options: {expected}")
  ranges = _checked_ranges(name)
  in_range = [p for p in problems if p.kind == "range"]
  if in_range:
    parts.append(f"{cls.__name__} (attention {name!r}): " +
                 "; ".join(ranges[p.option].requirement(p.option, p.value) for p in in_range))
  raise OptionError("; ".join(parts), problems)


def _frozen_key(value: Any) -> Any:
  """A hashable key that tells apart values Python calls equal (True, 1 and 1.0 are one dict key, not one option)."""
  if isinstance(value, Mapping):
    return ("mapping", tuple(sorted((k, _frozen_key(v)) for k, v in value.items())))
  if isinstance(value, (list, tuple)):
    return (type(value).__name__, tuple(_frozen_key(v) for v in value))
  return (type(value), value)


def resolve(name: str, num_layers: int, user_options: Mapping[str, Any], /, *,
            layer_options: Sequence[Mapping[str, Any]] | None = None) -> tuple[AttentionSpec, ...]:
  """The `AttentionSpec` of each of `num_layers` layers of variant `name`, decided in this one place:

  1. the registry defaults (the variant's dataclass fields);
  2. the variant's per-layer schedule (`default_layer_options(num_layers)`, e.g. TransNormer's DiagAttention in the
     lower half) for every option the user did not set;
  3. `user_options`, the options the user set (the keys present, whatever their values: setting an option to its
     default value still wins over the schedule);
  4. `layer_options` (one mapping per layer, e.g. `config.model.layer_options`): the user's per-layer overrides, which
     win over everything for their layer and replace the schedule.

  Every given value is checked once against its range; the model-owned options (`encoder_owned_options()`) may not
  appear (the model gives them to `AttentionSpec.build`). A `"name"` key in `user_options` must equal `name`. Refusals
  raise `OptionError` (a ValueError) naming the variant, the option, the value and the range. The answer is a pure
  function of the arguments and the registry, so it is computed once per distinct input (the config check, the
  config record and the model share it).
  """
  try:
    key = (name, get_class(name), num_layers, _frozen_key(user_options),
           None if layer_options is None else _frozen_key([dict(o) for o in layer_options]))
    hash(key)
  except TypeError:  # an unhashable option value: resolve without the memo
    return _resolve(name, num_layers, user_options, layer_options)
  if key not in _RESOLVED:
    if len(_RESOLVED) >= _MEMO_SIZE:
      _RESOLVED.clear()
    _RESOLVED[key] = _resolve(name, num_layers, user_options, layer_options)
  return _RESOLVED[key]


# resolve's answers by frozen input (the class is part of the key: a test may register a name again).
_RESOLVED: dict[Any, tuple[AttentionSpec, ...]] = {}
_MEMO_SIZE = 512


def _resolve(name: str, num_layers: int, user_options: Mapping[str, Any],
             layer_options: Sequence[Mapping[str, Any]] | None) -> tuple[AttentionSpec, ...]:
  cls = get_class(name)
  user = dict(user_options)
  if user.pop("name", name) != name:
    raise ValueError(f"resolve({name!r}, ...): user_options name {user_options['name']!r} is another variant")
  if layer_options is not None and any(dict(o).get("name", name) != name for o in layer_options):
    raise ValueError(f"layer_options may not change the attention variant ({name!r}) per layer")
  per_layer_given = [{k: v for k, v in dict(o).items() if k != "name"} for o in layer_options or ()]
  problems = _given_problems(name, user, "")
  for i, given in enumerate(per_layer_given):
    problems += _given_problems(name, given, f"layer_options[{i}]")
  if problems:
    _raise(name, problems)
  if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
    raise ValueError(f"resolve({name!r}, ...): num_layers must be an integer >= 1, got {num_layers!r}")
  if layer_options is not None:
    if len(layer_options) != num_layers:
      raise ValueError(f"layer_options has {len(layer_options)} entries; expected one per layer ({num_layers})")
    per_layer = tuple(per_layer_given)
    schedule: Sequence[Mapping[str, Any]] = ({},) * num_layers
  else:
    per_layer = ({},) * num_layers
    schedule = cls.default_layer_options(num_layers) or ({},) * num_layers
    if len(schedule) != num_layers:
      raise ValueError(f"{cls.__name__}.default_layer_options({num_layers}) gave {len(schedule)} layers")
  owned = encoder_owned_options()
  defaults = {k: v for k, v in options(name).items() if k not in owned}
  out = []
  for i, (scheduled, override) in enumerate(zip(schedule, per_layer)):
    from_schedule = {k: v for k, v in dict(scheduled).items() if k not in user}
    if from_schedule and out_of_range(name, from_schedule):  # the variant's own schedule: a bug, named as one
      raise ValueError(f"{cls.__name__}.default_layer_options({num_layers}) layer {i}: "
                       f"{out_of_range(name, from_schedule)}")
    layer = {**defaults, **from_schedule, **user, **override}
    missing = sorted(k for k, v in layer.items() if v is dataclasses.MISSING)
    if missing:
      raise ValueError(f"attention variant {name!r} requires option(s) {missing} (layer {i})")
    out.append(AttentionSpec(name, cls, layer))
  return tuple(out)


def build(name: str, /, **kwargs: Any) -> nn.Module:
  """Builds the attention variant `name` with `kwargs` as options, through the same gate as a model's layers: the
  variant's options resolved and checked once (`resolve(name, 1, ...)`: unknown options raise ValueError naming the
  valid ones, a value outside its range names the variant, the option, the value and the range), then the model-owned
  ones and `name=` / `parent=` (Flax's own module arguments, so an encoder can give every variant the same submodule
  name) by `AttentionSpec.build`.
  """
  owned = encoder_owned_options()
  valid = options(name)
  unknown = sorted(k for k in kwargs if k not in valid and k not in _FLAX_FIELDS)
  if unknown:
    raise ValueError(
        f"unknown option(s) {unknown} for attention variant {name!r}; valid options: {', '.join(sorted(valid))}")
  own = {k: v for k, v in kwargs.items() if k not in owned and k not in _FLAX_FIELDS}
  missing = sorted(k for k, v in valid.items() if v is dataclasses.MISSING and k not in kwargs)
  if missing:
    raise ValueError(f"attention variant {name!r} requires option(s) {missing}")
  [spec] = resolve(name, 1, own, layer_options=[{}])
  return spec.build(**{k: v for k, v in kwargs.items() if k in owned or k in _FLAX_FIELDS})


def spec_of(config: Mapping[str, Any], /) -> AttentionSpec:
  """The one-layer spec of `{"name": ..., **options}` through the gate (for code handed a config mapping rather than
  the specs a model resolved); an `AttentionSpec` passes through."""
  if isinstance(config, AttentionSpec):
    return config
  user = dict(config)
  if "name" not in user:
    raise ValueError(f"attention config needs a 'name' (one of: {', '.join(names())}); got keys {sorted(user)}")
  name = user.pop("name")
  return resolve(name, 1, user, layer_options=[{}])[0]


def build_attention(config: Mapping[str, Any], /, **encoder_owned: Any) -> nn.Module:
  """Builds the layer a model's attention config describes: `config = {"name": ..., **user options}`.

  `encoder_owned` are the options the model sets on every layer (`encoder_owned_options()`: heads, widths, causal,
  dropout, decode, dtype) plus Flax's `name=` / `parent=`; the registry fills every other option's default. A config
  entry for an option the model also sets is an error unless it only repeats the registry default (a config filled
  with every default) or the model's value (`owned_entries`); unknown options raise ValueError naming the valid ones.
  """
  user = dict(config)
  if "name" not in user:
    raise ValueError(f"attention config needs a 'name' (one of: {', '.join(names())}); got keys {sorted(user)}")
  name = user.pop("name")
  user = owned_entries(name, user, encoder_owned)
  [spec] = resolve(name, 1, user, layer_options=[{}])
  return spec.build(**encoder_owned)


def owned_entries(name: str, user: Mapping[str, Any], model_values: Mapping[str, Any]) -> dict[str, Any]:
  """`user` without its model-owned entries, each of which may only repeat the registry default or the model's value
  (`model_values`); ValueError naming the entry and the fix otherwise."""
  defaults = options(name)
  out = dict(user)
  for key in [k for k in user if k in encoder_owned_options()]:
    model = model_values.get(key, defaults.get(key))
    if user[key] not in (defaults.get(key), model):
      raise ValueError(f"attention option {key}={user[key]!r} is set by the model ({key}={model!r}); "
                       f"remove it from the attention config and set it on the model instead")
    del out[key]
  return out
