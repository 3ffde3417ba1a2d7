"""The registry proper: which Flax module is registered under which name, and the options each one takes.

`register(name)` (a class decorator), `names()`, `get_class(name)`, `options(name)` (the options with their
defaults), `option_ranges(name)` / `option_constraints(name)` (what the variant declares beside its fields) and
`checked_ranges(name)` (what the gate holds each option to). Nothing here checks a value: the gate
(attention/gate.py, attention/specs.py) does, once.

Dependency direction: catalog -> base, ranges; nothing here imports the gate.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Mapping, TypeVar

import flax.linen as nn

from attention import ranges as ranges_lib
from attention.base import REGISTERED_AS
from attention.ranges import Constraint, Range

_REGISTRY: dict[str, type[nn.Module]] = {}

# Flax's own dataclass fields, accepted by `build` but not reported as options.
FLAX_FIELDS = ("parent", "name")
_FLAX_FIELDS = FLAX_FIELDS  # its name while it was private to registry.py

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
    if f.name in FLAX_FIELDS or not f.init:
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


def option_constraints(name: str, /) -> tuple[Constraint, ...]:
  """The constraints between options variant `name` declares (`option_constraints`, base classes first)."""
  return ranges_lib.declared_constraints(get_class(name))


def checked_ranges(name: str, /) -> dict[str, Range]:
  """What the gate holds each option to: the declared range, else the type of the option's default."""
  declared = option_ranges(name)
  out = {}
  for key, default in options(name).items():
    rng = declared.get(key) or ranges_lib.like_default(default)
    if rng is not None:
      out[key] = rng
  return out


_checked_ranges = checked_ranges  # its name while it was private to registry.py


def out_of_range(name: str, values: Mapping[str, Any], /) -> list[tuple[str, Any, Range]]:
  """`(option, value, range)` for every value in `values` outside the range the gate holds its option to."""
  ranges = checked_ranges(name)
  return [(k, v, ranges[k]) for k, v in values.items() if k in ranges and not ranges[k].contains(v)]
