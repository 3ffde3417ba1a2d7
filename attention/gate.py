"""The one gate for a variant's own options: `resolve(name, num_layers, user_options, *, layer_options=None)`.

It decides a model's per-layer options once (registry defaults, then the variant's per-layer schedule for the options
the user did not set, then the user's, which always win, then per-layer overrides), checks every given value once
against the ranges the variant declares beside its fields (attention/ranges.py; an option without one is held to its
default's type) and the constraints between its own options (`option_constraints` that read no model-owned option),
and returns frozen `AttentionSpec`s (attention/specs.py). A refusal is an `OptionError` whose `problems` the config
validation formats (lra/training/config_checks.py) instead of checking again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from attention import catalog
from attention import ranges as ranges_lib
from attention.base import encoder_owned_options, frozen_key
from attention.specs import AttentionSpec, OptionError, Problem


def _given_problems(name: str, given: Mapping[str, Any], where: str) -> list[Problem]:
  """Problems of the options the user wrote at `where`: model-owned, unknown, or outside their range."""
  owned = encoder_owned_options()
  defaults = catalog.options(name)
  ranges = catalog.checked_ranges(name)
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


def _spec_constraints(name: str) -> tuple[ranges_lib.Constraint, ...]:
  """The variant's constraints that read only its own options (the others wait for the model: attention/specs.py)."""
  owned = set(encoder_owned_options())
  return tuple(c for c in catalog.option_constraints(name) if not owned & set(c.options))


def _constraint_problems(name: str, layer: Mapping[str, Any], override: Mapping[str, Any], i: int) -> list[Problem]:
  """Problems of one resolved layer's constraints; `where` is the per-layer override that set the option, if one did."""
  out = []
  for c in _spec_constraints(name):
    if c.violated(layer):
      where = f"layer_options[{i}]" if c.option in override else ""
      out.append(Problem(where, c.option, layer[c.option], "constraint", c.describe(layer), c.requirement(layer)))
  return out


def _raise(name: str, problems: list[Problem]) -> None:
  """One line naming every problem, grouped as the messages users know."""
  cls = catalog.get_class(name)
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
  ranges = catalog.checked_ranges(name)
  in_range = [p for p in problems if p.kind in ("range", "constraint")]
  if in_range:
    parts.append(f"{cls.__name__} (attention {name!r}): " +
                 "; ".join(dict.fromkeys(p.requirement or ranges[p.option].requirement(p.option, p.value)
                                         for p in in_range)))
  raise OptionError("; ".join(parts), problems)


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

  Every given value is checked once against its range, and every layer against the constraints between the variant's
  own options; the model-owned options (`encoder_owned_options()`) may not appear (the model gives them to
  `AttentionSpec.build`, which checks them and the constraints that read them). A `"name"` key in `user_options` must
  equal `name`. Refusals raise `OptionError` (a ValueError) naming the variant, the option, the value and the range.
  The answer is a pure function of the arguments and the registry, so it is computed once per distinct input (the
  config check, the config record and the model share it).
  """
  try:
    key = (name, catalog.get_class(name), num_layers, frozen_key(user_options),
           None if layer_options is None else frozen_key([dict(o) for o in layer_options]))
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
  cls = catalog.get_class(name)
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
  defaults = {k: v for k, v in catalog.options(name).items() if k not in owned}
  out = []
  for i, (scheduled, override) in enumerate(zip(schedule, per_layer)):
    from_schedule = {k: v for k, v in dict(scheduled).items() if k not in user}
    if from_schedule and catalog.out_of_range(name, from_schedule):  # the variant's own schedule: a bug, named
      raise ValueError(f"{cls.__name__}.default_layer_options({num_layers}) layer {i}: "
                       f"{catalog.out_of_range(name, from_schedule)}")
    layer = {**defaults, **from_schedule, **user, **override}
    missing = sorted(k for k, v in layer.items() if v is dataclasses.MISSING)
    if missing:
      raise ValueError(f"attention variant {name!r} requires option(s) {missing} (layer {i})")
    problems += _constraint_problems(name, layer, override, i)
    out.append(AttentionSpec(name, cls, layer))
  if problems:  # a constraint every layer breaks the same way is named once
    _raise(name, [p for j, p in enumerate(problems) if p not in problems[:j]])
  return tuple(out)
