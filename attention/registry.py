"""Registry of attention variants: `register`, `names`, `build`, `options`.

Variants register themselves with a decorator so that adding one never touches a dispatch ladder:

    @attention.register("performer")
    class Performer(AttentionLayer): ...

`build(name, **options)` validates the name and the options against the variant's dataclass fields and returns an
unbound Flax module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, TypeVar

import flax.linen as nn

_REGISTRY: dict[str, type[nn.Module]] = {}

# Flax's own dataclass fields, accepted by `build` but not reported as options.
_FLAX_FIELDS = ("parent", "name")

M = TypeVar("M", bound=type[nn.Module])


def register(name: str) -> Callable[[M], M]:
  """Class decorator that registers a Flax attention module under `name`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"attention name must be a non-empty string, got {name!r}")

  def decorator(cls: M) -> M:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
      raise TypeError(f"@register({name!r}) expects a flax.linen.Module subclass, got {cls!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"attention variant {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
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
    raise ValueError(f"unknown attention variant {name!r}; valid choices: {', '.join(names())}") from None


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


def build(name: str, /, **kwargs: Any) -> nn.Module:
  """Builds the attention variant `name` with `kwargs` as options.

  `name=` and `parent=` (Flax's own module arguments) pass through, so an encoder can give every variant the same
  submodule name. Unknown options raise ValueError naming the valid ones.
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
  return cls(**kwargs)


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
