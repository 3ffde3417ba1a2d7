"""Helpers shared by config files: strict `key=value` argument parsing and attention sub-configs."""

from __future__ import annotations

import ast
import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import ml_collections

import attention as attention_lib

# Options every attention layer gets from the encoder (model-level settings), not from the attention sub-config.
ENCODER_OWNED_OPTIONS = ("num_heads", "qkv_dim", "causal", "dropout_rate", "decode")


def _parse_value(text: str, default: Any) -> Any:
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("1", "true", "yes", ""):
      return True
    if lowered in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")
  if isinstance(default, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError(f"could not parse {text!r} as a Python literal") from None
  if isinstance(default, float) and isinstance(value, int):
    value = float(value)
  if default is not None and not isinstance(value, type(default)):
    raise ValueError(f"expected a {type(default).__name__}, got {text!r}")
  return value


def parse_arg(arg: str | None, defaults: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Parses `"key=value,key"` strictly against `defaults` (a bare `key` means `key=True`).

  Unknown keys and unparseable values raise ValueError naming the valid keys.
  """
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; valid keys: {', '.join(sorted(defaults))}")
    try:
      out[key] = _parse_value(text.strip(), defaults[key])
    except ValueError as e:
      raise ValueError(f"config argument {key}: {e}") from None
  return ml_collections.ConfigDict(out)


def attention_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`{"name": name, **options}` with the variant's default options, so dotted overrides such as
  `--config.model.attention.num_features=512` can set them. Unknown name -> ValueError naming the valid choices."""
  defaults = attention_lib.options(name)
  options = {k: v for k, v in defaults.items() if k not in ENCODER_OWNED_OPTIONS and v is not dataclasses.MISSING}
  unknown = sorted(set(overrides) - set(options))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for attention {name!r}; valid options: {sorted(options)}")
  options.update(overrides)
  # Options defaulting to None (e.g. `implementation`) still need a type that accepts strings from the command line.
  config = ml_collections.ConfigDict({"name": name})
  for key, value in options.items():
    config[key] = ml_collections.FieldReference(value, field_type=str) if value is None else value
  return config


def sweep_grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """The product of `{"dotted.config.key": [values...]}` as a list of override dicts (a config's `get_sweep()`)."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]
