"""Option ranges: what values a variant's options accept, declared once beside the variant's fields.

A variant lists its ranges in the class table `option_ranges` (merged along the class hierarchy, so a subclass adds
to or replaces its base's):

    @attention.register("transnormer")
    class TransNormer(RecurrentLayer):
      mode: str = "norm"
      block_size: int = 64
      option_ranges = {"mode": OneOf(MODES), "block_size": Integer(1)}

The one gate (`attention.resolve` / `attention.build`, attention/registry.py) reads these tables once; the config
validation (`lra/training/config_checks.py`) formats the gate's problems and states its own rules (`config.train.*`,
...) in this same vocabulary, so an out-of-range value is refused before data is read with the same range text
everywhere. An option without a declared range is held to the type of its default (`like_default`). Ranges say what
holds for any model; constraints between options and the model (a window no wider than the sequence, heads that
divide a width) stay in the variant's own checks, where only a call knows the shapes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Sequence


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Range:
  """Base class: `contains(value)`; `describe()` ("an integer >= 1") for config errors and `requirement(option,
  value)` ("block_size must be >= 1, got block_size=0") for build errors."""

  def contains(self, value: Any) -> bool:
    raise NotImplementedError

  def describe(self) -> str:
    raise NotImplementedError

  def requirement(self, option: str, value: Any) -> str:
    return f"{option} must be {self.describe()}, got {option}={value!r}"


@dataclasses.dataclass(frozen=True)
class Integer(Range):
  """An int in [lo, hi] (either bound open-ended when None); `allow_none` also accepts None."""

  lo: int | None = None
  hi: int | None = None
  allow_none: bool = False

  def contains(self, value: Any) -> bool:
    if value is None:
      return self.allow_none
    return _is_int(value) and (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

  def _bound(self) -> str:
    if self.lo is not None and self.hi is not None:
      return f"in [{self.lo}, {self.hi}]"
    if self.lo is not None:
      return f">= {self.lo}"
    return f"<= {self.hi}" if self.hi is not None else ""

  def describe(self) -> str:
    return " ".join(filter(None, ["an integer", self._bound()])) + (" or None" if self.allow_none else "")

  def requirement(self, option: str, value: Any) -> str:
    bound = self._bound() if _is_int(value) else self.describe()
    return f"{option} must be {bound or self.describe()}, got {option}={value!r}"


@dataclasses.dataclass(frozen=True)
class Real(Range):
  """A finite number in the interval lo..hi; `lo_open` / `hi_open` exclude the ends."""

  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  allow_none: bool = False

  def contains(self, value: Any) -> bool:
    if value is None:
      return self.allow_none
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)):
      return False
    if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
      return False
    return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

  def describe(self) -> str:
    if self.lo is not None and self.hi is not None:
      text = f"a number in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
    elif self.lo is not None:
      text = f"a number {'>' if self.lo_open else '>='} {self.lo}"
    elif self.hi is not None:
      text = f"a number {'<' if self.hi_open else '<='} {self.hi}"
    else:
      text = "a number"
    return text + (" or None" if self.allow_none else "")


@dataclasses.dataclass(frozen=True)
class OneOf(Range):
  """One of `choices` (a sequence, or a function giving it, so a registry is read when the check runs); `what` names
  the option in errors ("softmax implementation"), default its own name."""

  choices: Sequence[Any] | Callable[[], Sequence[Any]]
  what: str | None = None

  def valid(self) -> tuple[Any, ...]:
    return tuple(self.choices() if callable(self.choices) else self.choices)

  def contains(self, value: Any) -> bool:
    try:
      return value in self.valid()
    except TypeError:  # an unhashable value compared with hashable choices
      return False

  def describe(self) -> str:
    return f"one of {', '.join(repr(c) for c in self.valid())}"

  def requirement(self, option: str, value: Any) -> str:
    return f"unknown {self.what or option} {value!r}; valid choices: {self.valid()}"


@dataclasses.dataclass(frozen=True)
class Boolean(Range):
  """True or False (not 0 / 1)."""

  def contains(self, value: Any) -> bool:
    return isinstance(value, bool)

  def describe(self) -> str:
    return "True or False"


@dataclasses.dataclass(frozen=True)
class Text(Range):
  """Any string."""

  def contains(self, value: Any) -> bool:
    return isinstance(value, str)

  def describe(self) -> str:
    return "a string"


@dataclasses.dataclass(frozen=True)
class Sequence_(Range):
  """A tuple or list (of anything)."""

  def contains(self, value: Any) -> bool:
    return isinstance(value, (tuple, list))

  def describe(self) -> str:
    return "a tuple"


@dataclasses.dataclass(frozen=True)
class Satisfies(Range):
  """Any rule a predicate states, with its description ("a non-empty tuple of positive integers")."""

  predicate: Callable[[Any], bool]
  description: str

  def contains(self, value: Any) -> bool:
    try:
      return bool(self.predicate(value))
    except (TypeError, ValueError):
      return False

  def describe(self) -> str:
    return self.description


def like_default(default: Any) -> Range | None:
  """The range an option without a declared one is held to: the type of its default (None or no default: any
  value). Integers accept integers, floats any finite number."""
  if default is None or default is dataclasses.MISSING:
    return None
  if isinstance(default, bool):
    return Boolean()
  if isinstance(default, numbers.Integral):
    return Integer()
  if isinstance(default, numbers.Real):
    return Real()
  if isinstance(default, str):
    return Text()
  if isinstance(default, (tuple, list)):
    return Sequence_()
  return None


def declared(cls: type) -> dict[str, Range]:
  """The merged `option_ranges` of `cls`, base classes first (a subclass adds to or narrows its base's)."""
  out: dict[str, Range] = {}
  for klass in reversed(cls.__mro__):
    out.update(vars(klass).get("option_ranges") or {})
  return out


def check(cls: type, label: str, values: Any) -> None:
  """Raises ValueError naming the variant, each option outside its declared range, its value and the range;
  `values` maps option names to values (options without a declared range are not checked here)."""
  ranges = declared(cls)
  problems = [(k, v, ranges[k]) for k, v in dict(values).items() if k in ranges and not ranges[k].contains(v)]
  if problems:
    raise ValueError(f"{cls.__name__} (attention {label!r}): " + "; ".join(r.requirement(k, v) for k, v, r in problems))


__all__ = ["Boolean", "Integer", "OneOf", "Range", "Real", "Satisfies", "Sequence_", "Text", "check", "declared",
           "like_default"]
