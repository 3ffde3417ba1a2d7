"""Registry of attention variants: `register`, `names`, `build`, `options`.

Variants register themselves with a decorator so that adding one never touches a dispatch ladder:

    @attention.register("performer")
    class Performer(AttentionLayer): ...

`build(name, **options)` validates the name and the options against the variant's dataclass fields and returns an
unbound Flax module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

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
