"""The command-line and arg-string machinery of config files (configs/common.py holds the skeleton they fill):

- strict `key=value,key` arguments of `get_config(arg)` (`parse_arg`);
- the attention sub-config: `{"name": ..., **the options the user set}` (`attention_config`, `attention_options`),
  typed fields for options a command line names (`_with_option_fields`);
- dotted overrides (`apply_overrides`: sweeps and scripts; `parse_override`);
- the `--config` flag (`DEFINE_config_file`): ml_collections' config file flag whose
  `--config.model.attention.name=X` switches the variant, X's options following on the same command line.

Dependency: configs/common.py imports this module (and re-exports its names, so `common.parse_arg`,
`common.DEFINE_config_file`, `common.apply_overrides` keep working); this module imports nothing of common.py.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

import attention as attention_lib

encoder_owned_options = attention_lib.encoder_owned_options

# ----------------------------------------------------------------------------------------------------------------------
# Strict `key=value` arguments.


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
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
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


# ----------------------------------------------------------------------------------------------------------------------
# The attention sub-config.


def attention_options(name: str) -> dict[str, Any]:
  """The options of variant `name` a config may set (all but the model-owned ones), with their defaults."""
  owned = encoder_owned_options()
  return {k: v for k, v in attention_lib.options(name).items() if k not in owned}


def _option_type(name: str, key: str, default: Any) -> type:
  """The type command-line values for option `key` of variant `name` are parsed as (from its annotation if the
  default is None: `int | None` -> int, `Literal["a", "b"] | None` -> str)."""
  if default is not None and default is not dataclasses.MISSING:
    return type(default)
  try:
    hint = typing.get_type_hints(attention_lib.get_class(name)).get(key, str)
  except Exception:  # pylint: disable=broad-except  (an unresolvable annotation: strings are the safe choice)
    return str
  pending = [hint]
  while pending:
    hint = pending.pop(0)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
      return type(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
      pending.extend(a for a in typing.get_args(hint) if a is not type(None))
    elif isinstance(hint, type) and hint is not type(None):
      return typing.get_origin(hint) or hint
  return str


def attention_config(name: str, **options: Any) -> ml_collections.ConfigDict:
  """`{"name": name, **options}`: the variant and the options the user set (the registry supplies the rest at build
  time). Unknown name or option -> ValueError naming the valid choices."""
  valid = attention_options(name)  # raises for an unknown name, naming the valid ones
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for attention {name!r}; valid options: {', '.join(sorted(valid))}")
  return ml_collections.ConfigDict({"name": name, **options})


def _with_option_fields(sub: Mapping[str, Any], keys: Sequence[str]) -> ml_collections.ConfigDict:
  """`sub` (an attention sub-config) with a typed field for each option in `keys` it lacks, holding the registry
  default until the override that named it sets it: so overrides parse as the option's type and the sub-config still
  holds only options the user set. Keys that are not options of the variant get no field (the override then fails
  naming the key)."""
  out = ml_collections.ConfigDict(dict(sub.items()))
  name = out.get("name")
  valid = attention_options(name)
  for key in keys:
    if key in out or key not in valid:
      continue
    default = valid[key]
    out[key] = default if default is not None and default is not dataclasses.MISSING else \
        ml_collections.FieldReference(None, field_type=_option_type(name, key, default))
  return out


# ----------------------------------------------------------------------------------------------------------------------
# Dotted overrides: `{"train.learning_rate": 1e-3, "model.attention.name": "linear"}`.

ATTENTION = "model.attention"


def _node(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parents[:i]) or "the config"
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ValueError(f"{key}: {where} has no {part!r}; valid keys: {', '.join(valid)}")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    raise ValueError(f"{key}: {'.'.join(parents) or 'the config'} has no {leaf!r}; valid keys: {', '.join(valid)}")
  return node, leaf


def parse_override(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
  """`text` parsed as the type of field `key` of `config` (strings stay strings)."""
  node, leaf = _node(config, key)
  field_type = node.get_type(leaf)
  if field_type is str:
    return text
  if field_type is type(None) or field_type is None:
    field_type = str
  if text.lower() in ("none", "null"):
    return None
  try:
    return _parse_value(text, field_type() if field_type in (bool, int, float, tuple, list) else None)
  except ValueError as e:
    raise ValueError(f"{key}: {e} for a {field_type.__name__} field") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set (strings are parsed as the field's type), the attention variant applied
  first and its options resolved. An unknown key or a bad value -> ValueError naming the key."""
  config = copy.deepcopy(config)
  config.unlock()
  if "attention" in config.get("model", {}) and isinstance(config.model.attention, ml_collections.ConfigDict):
    sub = config.model.attention
    name = overrides.get(f"{ATTENTION}.name", sub.get("name"))
    keys = [k[len(ATTENTION) + 1:] for k in overrides if k.startswith(ATTENTION + ".") and k != f"{ATTENTION}.name"]
    try:
      config.model.attention = _with_option_fields(sub if name == sub.get("name") else attention_config(name), keys)
    except ValueError as e:
      raise ValueError(f"{ATTENTION}.name={name}: {e}") from None
  for key, value in overrides.items():
    node, leaf = _node(config, key)
    if isinstance(value, str):
      value = parse_override(config, key, value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"{key}={value!r}: {e}") from None
  return config


# ----------------------------------------------------------------------------------------------------------------------
# The `--config` flag: ml_collections' config file flag, attention-aware.


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of "path.py" or "path.py:arg"; FileNotFoundError naming a missing path."""
  path, colon, arg = spec.partition(":")
  module = load_module(path)
  return module.get_config(arg) if colon else module.get_config()


def load_module(path: str) -> types.ModuleType:
  if not Path(path).is_file():
    raise FileNotFoundError(f"config file {path!r} not found; pass --config=configs/<task>.py[:arg] (relative to the "
                            f"working directory {Path.cwd()})")
  spec = importlib.util.spec_from_file_location(f"config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _attention_overrides(flag_name: str, argv: Sequence[str]) -> dict[str, str | None]:
  """`{option: text}` for each `--<flag>.model.attention.<option>[=text]` on the command line (last one wins;
  text None for a bare boolean flag)."""
  pattern = re.compile(rf"^--?(no)?{re.escape(flag_name)}\.{re.escape(ATTENTION)}\.([A-Za-z0-9_]+)(=(.*))?$")
  out: dict[str, str | None] = {}
  for i, arg in enumerate(argv):
    match = pattern.match(arg)
    if not match:
      continue
    negated, key, has_value, text = match.groups()
    if not has_value and key == "name" and i + 1 < len(argv):
      text = argv[i + 1]  # `--config.model.attention.name performer`
    out[key] = "false" if negated else text
  return out


def prepare_for_command_line(config: ml_collections.ConfigDict, attention_overrides: Mapping[str, str | None],
                             flag_name: str = "config") -> ml_collections.ConfigDict:
  """Switches the attention sub-config to the variant the command line names and adds a typed field for each option
  the command line sets, so that ml_collections' override flags exist for them; the sub-config then holds exactly
  the options the user set. Unknown variant or options -> ValueError naming the valid ones."""
  if "model" not in config or "attention" not in config.model:
    return config
  sub = config.model.attention
  name = attention_overrides.get("name") or sub.get("name")
  try:
    sub = sub if name == sub.get("name") else attention_config(name)
    valid = attention_options(name)
  except ValueError as e:
    raise ValueError(f"--{flag_name}.{ATTENTION}.name={name}: {e}") from None
  unknown = sorted(k for k in attention_overrides if k != "name" and k not in valid)
  if unknown:
    given = " ".join(f"--{flag_name}.{ATTENTION}.{k}" for k in unknown)
    raise ValueError(f"{given}: unknown option(s) for attention {name!r}; valid options: {', '.join(sorted(valid))} "
                     f"(model-owned options {', '.join(encoder_owned_options())} come from --{flag_name}.model)")
  config.model.attention = _with_option_fields(sub, [k for k in attention_overrides if k != "name"])
  return config


class _ConfigFileParser(flags.ArgumentParser):
  """Parses `--config=path.py[:arg]`: loads the file and prepares the attention sub-config for the overrides."""

  def __init__(self, name: str, lock_config: bool, argv: Callable[[], Sequence[str]]):
    self.name = name
    self._lock_config = lock_config
    self._argv = argv

  def parse(self, argument: Any) -> ml_collections.ConfigDict:
    config = load_config_file(argument) if isinstance(argument, str) else argument
    config = prepare_for_command_line(config, _attention_overrides(self.name, self._argv()), self.name)
    if self._lock_config:
      config.lock()
    return config

  def flag_type(self) -> str:
    return "config object"


def DEFINE_config_file(name: str = "config", default: str | None = None,  # pylint: disable=invalid-name
                       help_string: str = "Config file, optionally with ':arg'.", *,
                       flag_values: flags.FlagValues = flags.FLAGS, lock_config: bool = True,
                       sys_argv: Sequence[str] | None = None) -> flags.FlagHolder:
  """`ml_collections.config_flags.DEFINE_config_file` whose `--<name>.model.attention.name=X` switches the variant
  (X's options then follow on the same command line, in any order), and whose attention sub-config holds the options
  the file and the command line set (`attention.resolve` supplies the rest when the model is built).
  `sys_argv`: the command line to read overrides from (default sys.argv, as ml_collections does)."""
  holder = config_flags.DEFINE_config_file(name, default, help_string, flag_values=flag_values,
                                           lock_config=lock_config, sys_argv=sys_argv)
  flag = flag_values[name]

  def argv() -> Sequence[str]:
    # The config flag's own view of the command line (sys.argv with --flagfile expanded), as ml_collections uses.
    get = getattr(flag, "_GetArgv", None)
    return get() if get is not None else sys.argv

  flag.parser = _ConfigFileParser(name, lock_config, argv)
  return holder
