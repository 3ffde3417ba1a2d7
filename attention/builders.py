"""Building layers through the gate: `build(name, **options)` (a user building one layer), `build_attention(config,
**model_owned)` and `spec_of(config)` (code handed a `{"name": ..., **options}` mapping), and `owned_entries` (the
model-owned entries a config may repeat). Each passes through `attention.resolve` (attention/gate.py) once, then
`AttentionSpec.build` (attention/specs.py); nothing here checks a value itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from attention import base
from attention import catalog
from attention.base import encoder_owned_options
from attention.gate import resolve
from attention.specs import AttentionSpec, check_model_owned


def build(name: str, /, **kwargs: Any) -> nn.Module:
  """Builds the attention variant `name` with `kwargs` as options, through the same gate as a model's layers: the
  variant's options resolved and checked once (`resolve(name, 1, ...)`: unknown options raise ValueError naming the
  valid ones, a value outside its range names the variant, the option, the value and the range), then the model-owned
  ones and `name=` / `parent=` (Flax's own module arguments, so an encoder can give every variant the same submodule
  name) by `AttentionSpec.build`.
  """
  owned = encoder_owned_options()
  valid = catalog.options(name)
  flax_fields = catalog.FLAX_FIELDS
  unknown = sorted(k for k in kwargs if k not in valid and k not in flax_fields)
  if unknown:
    raise ValueError(
        f"unknown option(s) {unknown} for attention variant {name!r}; valid options: {', '.join(sorted(valid))}")
  own = {k: v for k, v in kwargs.items() if k not in owned and k not in flax_fields}
  missing = sorted(k for k, v in valid.items() if v is dataclasses.MISSING and k not in kwargs)
  if missing:
    raise ValueError(f"attention variant {name!r} requires option(s) {missing}")
  [spec] = resolve(name, 1, own, layer_options=[{}])
  return spec.build(**{k: v for k, v in kwargs.items() if k in owned or k in flax_fields})


def check_constructed_options(cls: type, options: Mapping[str, Any]) -> None:
  """The gate for a registered variant constructed directly (`LongformerAttention(num_heads=2, num_dilated_heads=3,
  dilation=2)` rather than `attention.build`), run once per distinct options by `AttentionLayer.__post_init__`: the
  same checks and one-line messages as `build` (`resolve`, then `check_model_owned`). A class the registry does not
  hold under its name (an abstract base, a subclass defined in a test) has no entry in the gate and is not checked."""
  name = base.registered_name(cls)
  if name not in catalog.names() or not issubclass(catalog.get_class(name), cls):
    return
  owned = encoder_owned_options()
  [spec] = resolve(name, 1, {k: v for k, v in options.items() if k not in owned}, layer_options=[{}])
  check_model_owned(spec, {k: v for k, v in options.items() if k in owned})


base.install_construction_gate(check_constructed_options)


def spec_of(config: Mapping[str, Any], /) -> AttentionSpec:
  """The one-layer spec of `{"name": ..., **options}` through the gate (for code handed a config mapping rather than
  the specs a model resolved); an `AttentionSpec` passes through."""
  if isinstance(config, AttentionSpec):
    return config
  user = dict(config)
  if "name" not in user:
    raise ValueError(f"attention config needs a 'name' (one of: {', '.join(catalog.names())}); got keys {sorted(user)}")
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
    raise ValueError(f"attention config needs a 'name' (one of: {', '.join(catalog.names())}); got keys {sorted(user)}")
  name = user.pop("name")
  user = owned_entries(name, user, encoder_owned)
  [spec] = resolve(name, 1, user, layer_options=[{}])
  return spec.build(**encoder_owned)


def owned_entries(name: str, user: Mapping[str, Any], model_values: Mapping[str, Any]) -> dict[str, Any]:
  """`user` without its model-owned entries, each of which may only repeat the registry default or the model's value
  (`model_values`); ValueError naming the entry and the fix otherwise."""
  defaults = catalog.options(name)
  out = dict(user)
  for key in [k for k in user if k in encoder_owned_options()]:
    model = model_values.get(key, defaults.get(key))
    if user[key] not in (defaults.get(key), model):
      raise ValueError(f"attention option {key}={user[key]!r} is set by the model ({key}={model!r}); "
                       f"remove it from the attention config and set it on the model instead")
    del out[key]
  return out
