"""The gate's answer: frozen per-layer `AttentionSpec`s, the `Problem`s of a refusal, and the gate for the options the
model owns.

`attention.resolve` (attention/gate.py) returns one `AttentionSpec` per layer: the variant and every option of its
own, checked once. The model-owned options (`encoder_owned_options()`: heads, widths, causal, dropout, decode, dtype,
positions) are known only when the model builds a layer: `AttentionSpec.build(**model_owned)` checks those
(`check_model_owned`: their ranges, the questions the spec answers, and the `option_constraints` that read them, such
as a bidirectional local window that must be odd or RoPE's even head dimension), never the spec's own options again.
The config validation asks `constraint_problems` with the values the config gives the model, before any tracing.
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn

from attention import catalog
from attention import positions as positions_lib
from attention import ranges as ranges_lib
from attention.base import COMMON_RANGES, built_by_gate, encoder_owned_options

# Constraints of the common (model-owned) options, held by every variant.
COMMON_CONSTRAINTS: tuple[ranges_lib.Constraint, ...] = (positions_lib.ROPE_HEAD_DIM,)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One thing the gate refused: `where` the user wrote it ("" = the attention config, "layer_options[i]", "model" =
  a model-owned option), the option, its value, the `kind` ("owned", "unknown", "range", "constraint"), what was
  `expected`, and for a constraint its one-line `requirement`."""

  where: str
  option: str
  value: Any
  kind: str
  expected: str
  requirement: str = ""


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
    ranges, causal / decode / positions against what the spec answers, the constraints that read them): the spec's
    own options passed the gate when it was made."""
    check_model_owned(self, model_owned)
    with built_by_gate(self.cls):  # checked: the layer's `__post_init__` records its options, checks nothing
      return self.cls(**self, **model_owned)


def _with_model_defaults(spec: AttentionSpec, model_owned: Mapping[str, Any]) -> dict[str, Any]:
  """The spec's options, the model-owned ones given, and the registry defaults of the model-owned ones not given."""
  owned = encoder_owned_options()
  return {**spec, **{k: v for k, v in catalog.options(spec.name).items() if k in owned},
          **{k: v for k, v in model_owned.items() if k in owned}}


def model_constraints(spec_or_cls: AttentionSpec | type) -> tuple[ranges_lib.Constraint, ...]:
  """The constraints that read a model-owned option (checked when the layer is built, and by the config check)."""
  cls = spec_or_cls.cls if isinstance(spec_or_cls, AttentionSpec) else spec_or_cls
  owned = set(encoder_owned_options())
  return tuple(c for c in COMMON_CONSTRAINTS + ranges_lib.declared_constraints(cls) if owned & set(c.options))


def constraint_problems(spec: AttentionSpec, model_owned: Mapping[str, Any]) -> list[Problem]:
  """The `Problem`s of the constraints that read a model-owned option, with the model's values `model_owned` (the
  model-owned options not given take their registry defaults): `where` is "model" for a model-owned option."""
  values = _with_model_defaults(spec, model_owned)
  owned = encoder_owned_options()
  return [Problem("model" if c.option in owned else "", c.option, values[c.option], "constraint", c.describe(values),
                  c.requirement(values))
          for c in model_constraints(spec) if c.violated(values)]


def check_model_owned(spec: AttentionSpec, model_owned: Mapping[str, Any]) -> None:
  """The gate for the options the model sets on every layer; one-line ValueErrors naming value and fix."""
  cls, owned = spec.cls, encoder_owned_options()
  not_owned = sorted(k for k in model_owned if k not in owned and k not in catalog.FLAX_FIELDS)
  if not_owned:
    raise ValueError(f"{not_owned} are not model-owned options (model-owned: {', '.join(owned)}); put variant "
                     f"options in the attention config")
  values = {**{k: v for k, v in catalog.options(spec.name).items() if k in owned}, **model_owned}
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
  problems = constraint_problems(spec, model_owned)
  if problems:
    raise OptionError(f"{label} (attention {spec.name!r}): " + "; ".join(p.requirement for p in problems), problems)
