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
everywhere. An option without a declared range is held to the type of its default (`like_default`). What one range
cannot say because it depends on other options, model-owned ones included (a bidirectional window is odd, RoPE needs
an even head dimension), is a `Constraint` in the class table `option_constraints`, checked by the same gate. Only
what a call alone knows (a window no wider than the sequence, shapes, masks) stays in the layer.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Sequence


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
  """An int in [lo, hi] (either bound open-ended when None); `allow_none` also accepts None; `multiple_of` (2: even)
  and `odd` add what a bound cannot say (a centred window is odd, LSH bucket pairs are even)."""

  lo: int | None = None
  hi: int | None = None
  allow_none: bool = False
  multiple_of: int | None = None
  odd: bool = False

  def _in_bounds(self, value: int) -> bool:
    return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

  def _in_step(self, value: int) -> bool:
    return (not self.odd or value % 2 == 1) and (not self.multiple_of or value % self.multiple_of == 0)

  def contains(self, value: Any) -> bool:
    if value is None:
      return self.allow_none
    return _is_int(value) and self._in_bounds(value) and self._in_step(value)

  def _bound(self) -> str:
    if self.lo is not None and self.hi is not None:
      return f"in [{self.lo}, {self.hi}]"
    if self.lo is not None:
      return f">= {self.lo}"
    return f"<= {self.hi}" if self.hi is not None else ""

  def _step(self) -> str:
    if self.odd:
      return "odd"
    if self.multiple_of == 2:
      return "even"
    return f"a multiple of {self.multiple_of}" if self.multiple_of else ""

  def describe(self) -> str:
    step = self._step()
    kind = f"an {step} integer" if step in ("odd", "even") else "an integer"
    multiple = f"that is {step}" if step and step not in ("odd", "even") else ""
    return " ".join(filter(None, [kind, self._bound(), multiple])) + (" or None" if self.allow_none else "")

  def requirement(self, option: str, value: Any) -> str:
    if _is_int(value) and self._in_bounds(value):  # only the step fails: say just that
      return f"{option} must be {self._step()}, got {option}={value!r}"
    bound = self._bound() if _is_int(value) and not self._step() else self.describe()
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


@dataclasses.dataclass(frozen=True)
class Constraint:
  """The range of `option` given other options of the same layer (`uses`, model-owned ones included: `causal`,
  `num_heads`, `qkv_dim`, `positions`): what one option's own range cannot say (a bidirectional window is odd, RoPE
  needs an even head dimension, `c <= stride`). `range_for(**used)` gives the range (None: any value); an option
  whose value is None is not known yet (`qkv_dim=None` before a call) and not checked; `why` (the reason and the fix)
  goes into the error.

  A variant declares its constraints beside its fields in the class table `option_constraints` (merged along the
  class hierarchy). The gate checks one that reads only the spec's own options in `attention.resolve`, and one that
  reads a model-owned option when the layer is built (`AttentionSpec.build`) and in the config validation (with the
  values the config gives the model): before any tracing, never again in the layer."""

  option: str
  uses: tuple[str, ...]
  range_for: Callable[..., Range | None]
  why: str = ""

  @property
  def options(self) -> tuple[str, ...]:
    """Every option the constraint reads: `option` and `uses`."""
    return (self.option, *self.uses)

  def range_given(self, values: Mapping[str, Any]) -> Range | None:
    """The range `option` must be in given `values` (None: any value)."""
    try:
      return self.range_for(**{k: values[k] for k in self.uses})
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a used value out of its own range: reported there
      return None

  def violated(self, values: Mapping[str, Any]) -> bool:
    """Whether `values[option]` is outside its range given `values`; an option still None (`qkv_dim=None`: the
    input's width) is not known yet, and its own range says whether None is allowed at all."""
    rng = self.range_given(values)
    return rng is not None and values.get(self.option) is not None and not rng.contains(values[self.option])

  def _given(self, values: Mapping[str, Any]) -> str:
    return "with " + ", ".join(f"{k}={values[k]!r}" for k in self.uses) + (f" ({self.why})" if self.why else "")

  def describe(self, values: Mapping[str, Any]) -> str:
    """What was expected, for config errors: "an odd integer >= 1 with causal=False (why)"."""
    rng = self.range_given(values)
    return f"{rng.describe() if rng else 'any value'} {self._given(values)}"

  def requirement(self, values: Mapping[str, Any]) -> str:
    """For build errors: "window must be odd with causal=False (why), got window=2"."""
    rng, value = self.range_given(values), values.get(self.option)
    head, sep, tail = rng.requirement(self.option, value).rpartition(", got ")
    if not sep:
      return f"{rng.requirement(self.option, value)} {self._given(values)}"
    return f"{head} {self._given(values)}{sep}{tail}"


# ---- constraints shared by several variants ------------------------------------------------------------------------

# `num_kv_heads` against the model's `num_heads` (grouped-query attention: flex, softmax, nsa declare it): checked by
# the gate when the layer is built (`AttentionSpec.build`, the config validation, a directly constructed layer), never
# again at a call. Here, not in one variant's module, so every variant that groups heads imports it from below.
KV_HEADS_DIVIDE_HEADS = Constraint(
    "num_kv_heads", ("num_heads",),
    lambda num_heads: Satisfies(lambda kv: num_heads % kv == 0, f"a divisor of {num_heads}"),
    why="grouped-query attention shares each key/value head between num_heads / num_kv_heads query heads; use a "
        "divisor of num_heads, or None for num_heads")


def declared_constraints(cls: type) -> tuple[Constraint, ...]:
  """The `option_constraints` of `cls` and its base classes, base classes first."""
  out: list[Constraint] = []
  for klass in reversed(cls.__mro__):
    out += [c for c in vars(klass).get("option_constraints") or () if c not in out]
  return tuple(out)


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


__all__ = ["Boolean", "Constraint", "Integer", "KV_HEADS_DIVIDE_HEADS", "OneOf", "Range", "Real", "Satisfies", "Sequence_", "Text", "check",
           "declared", "declared_constraints", "like_default"]
