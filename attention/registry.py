"""Registry of attention variants: `register`, `names`, `build`, `options`, `option_ranges`, `resolve`.

Variants register themselves with a decorator so that adding one never touches a dispatch ladder:

    @attention.register("performer")
    class Performer(AttentionLayer): ...

`build(name, **options)` validates the name and the options against the variant's dataclass fields and its declared
ranges (`option_ranges`, attention/ranges.py) and returns an unbound Flax module. `resolve(name, num_layers,
user_options)` is the one place a model's per-layer options are decided: registry defaults, then the variant's
per-layer schedule (`default_layer_options`) for the options the user did not set, then the user's (which always
win), then per-layer overrides.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Mapping, Sequence, TypeVar

import flax.linen as nn

from attention import ranges as ranges_lib
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


def out_of_range(name: str, values: Mapping[str, Any], /) -> list[tuple[str, Any, Range]]:
  """`(option, value, range)` for every value in `values` outside its option's declared range."""
  ranges = option_ranges(name)
  return [(k, v, ranges[k]) for k, v in values.items() if k in ranges and not ranges[k].contains(v)]


def _check_ranges(name: str, values: Mapping[str, Any]) -> None:
  ranges_lib.check(get_class(name), name, values)


def build(name: str, /, **kwargs: Any) -> nn.Module:
  """Builds the attention variant `name` with `kwargs` as options.

  `name=` and `parent=` (Flax's own module arguments) pass through, so an encoder can give every variant the same
  submodule name. Unknown options raise ValueError naming the valid ones; a value outside its declared range
  (`option_ranges`) raises ValueError naming the variant, the option, the value and the range.
  """
  cls = get_class(name)
  valid = options(name)
  unknown = sorted(k for k in kwargs if k not in valid and k not in _FLAX_FIELDS)
  if unknown:
    raise ValueError(
        f"unknown option(s) {unknown} for attention variant {name!r}; valid options: {', '.join(sorted(valid))}")
  missing = sorted(k for k, v in valid.items() if v is dataclasses.MISSING and k not in kwargs)
  if missing:
    raise ValueError(f"attention variant {name!r} requires option(s) {missing}")
  _check_ranges(name, {k: v for k, v in kwargs.items() if k not in _FLAX_FIELDS})
  return cls(**kwargs)


def _model_owned() -> tuple[str, ...]:
  from attention.base import encoder_owned_options  # pylint: disable=import-outside-toplevel  (avoids a cycle)
  return encoder_owned_options()


def resolve(name: str, num_layers: int, user_options: Mapping[str, Any], /, *,
            layer_options: Sequence[Mapping[str, Any]] | None = None) -> tuple[dict[str, Any], ...]:
  """The full options of each of `num_layers` layers of variant `name`, decided in this one place:

  1. the registry defaults (the variant's dataclass fields);
  2. the variant's per-layer schedule (`default_layer_options(num_layers)`, e.g. TransNormer's DiagAttention in the
     lower half) for every option the user did not set;
  3. `user_options`, the options the user set (the keys present, whatever their values: setting an option to its
     default value still wins over the schedule);
  4. `layer_options` (one mapping per layer, e.g. `config.model.layer_options`): the user's per-layer overrides, which
     win over everything for their layer and replace the schedule.

  The model-owned options (`encoder_owned_options()`: heads, widths, causal, dropout, decode, dtype) are not part of
  the result and may not appear in `user_options`: the model passes them to `build`. A `"name"` key in
  `user_options` must equal `name`. Unknown options, missing required ones and values outside their declared ranges
  raise ValueError naming the variant, the option, the value and the range.
  """
  cls = get_class(name)
  user = dict(user_options)
  if user.pop("name", name) != name:
    raise ValueError(f"resolve({name!r}, ...): user_options name {user_options['name']!r} is another variant")
  owned = _model_owned()
  defaults = {k: v for k, v in options(name).items() if k not in owned}
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"resolve({name!r}, ...): num_layers must be an integer >= 1, got {num_layers!r}")
  for where, given in [("the attention config", user)] + [
      (f"layer_options[{i}]", {k: v for k, v in dict(o).items() if k != "name"})
      for i, o in enumerate(layer_options or ())]:
    set_by_model = sorted(k for k in given if k in owned)
    if set_by_model:
      raise ValueError(f"attention option(s) {set_by_model} in {where} are set by the model (model-owned: "
                       f"{', '.join(owned)}); remove them there and set them on the model instead")
    unknown = sorted(k for k in given if k not in defaults)
    if unknown:
      raise ValueError(f"unknown option(s) {unknown} in {where} for attention variant {name!r}; valid options: "
                       f"{', '.join(sorted(defaults))}")
  if layer_options is not None:
    if len(layer_options) != num_layers:
      raise ValueError(f"layer_options has {len(layer_options)} entries; expected one per layer ({num_layers})")
    if any(dict(o).get("name", name) != name for o in layer_options):
      raise ValueError(f"layer_options may not change the attention variant ({name!r}) per layer")
    per_layer = tuple({k: v for k, v in dict(o).items() if k != "name"} for o in layer_options)
    schedule: Sequence[Mapping[str, Any]] = ({},) * num_layers
  else:
    per_layer = ({},) * num_layers
    schedule = cls.default_layer_options(num_layers) or ({},) * num_layers
    if len(schedule) != num_layers:
      raise ValueError(f"{cls.__name__}.default_layer_options({num_layers}) gave {len(schedule)} layers")
  out = []
  for i, (scheduled, override) in enumerate(zip(schedule, per_layer)):
    layer = {**defaults, **{k: v for k, v in dict(scheduled).items() if k not in user}, **user, **override}
    missing = sorted(k for k, v in layer.items() if v is dataclasses.MISSING)
    if missing:
      raise ValueError(f"attention variant {name!r} requires option(s) {missing} (layer {i})")
    _check_ranges(name, layer)
    out.append(layer)
  return tuple(out)


def build_attention(config: Mapping[str, Any], /, **encoder_owned: Any) -> nn.Module:
  """Builds the layer a model's attention config describes: `config = {"name": ..., **user options}`.

  `encoder_owned` are the options the model sets on every layer (`encoder_owned_options()`: heads, widths, causal,
  dropout, decode, dtype) plus Flax's `name=` / `parent=`; the registry fills every other option's default. A config
  entry for an option the model also sets is an error unless it only repeats the registry default (a config filled
  with every default) or the model's value; unknown options raise ValueError naming the valid ones.
  """
  from attention.base import encoder_owned_options  # pylint: disable=import-outside-toplevel  (avoids a cycle)
  user = dict(config)
  if "name" not in user:
    raise ValueError(f"attention config needs a 'name' (one of: {', '.join(names())}); got keys {sorted(user)}")
  name = user.pop("name")
  defaults = options(name)
  owned = encoder_owned_options()
  not_owned = sorted(k for k in encoder_owned if k not in owned and k not in _FLAX_FIELDS)
  if not_owned:
    raise ValueError(f"build_attention: {not_owned} are not model-owned options (model-owned: {', '.join(owned)}); "
                     f"put variant options in the attention config")
  for key in [k for k in user if k in encoder_owned]:
    if user[key] not in (defaults.get(key), encoder_owned[key]):
      raise ValueError(f"attention option {key}={user[key]!r} is set by the model ({key}={encoder_owned[key]!r}); "
                       f"remove it from the attention config and set it on the model instead")
    del user[key]
  return build(name, **user, **encoder_owned)
