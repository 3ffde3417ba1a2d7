"""What every config file shares: the config skeleton, strict `key=value` arguments, the attention sub-config,
dotted overrides (used by the command line and by sweeps) and sweep grids.

A config file calls `make_config(task, model=..., data=..., train=...)` with only what differs from the skeleton
(`MODEL`, `DATA`, `TRAIN` below). The attention sub-config holds the variant's name and exactly the options the user
set (the config file's and the command line's); nothing fills in defaults here: `attention.resolve` decides every
layer's options when the model is built (registry defaults, the variant's per-layer schedule, then what the user
set, which always wins, even when it equals a default). Switching the variant is one assignment:

  --config.model.attention.name=performer --config.model.attention.num_features=128

works from every config (`DEFINE_config_file` below handles the command line; `apply_overrides` does the same for
sweep points): an option named by an override gets its field, typed from the registry default, just before the
override sets it. A new variant name drops the previous variant's options.

LRA protocols (`protocol=` argument) and self-pretraining (`pretrain=` argument), each combination a named config:
- `protocol=paper` (default): each task file's own settings, Tay et al. 2020 (LRA Table 1; `scripts/lra_table.py` prints the
  published numbers beside ours).
- `protocol=small`: the small-model re-run protocol of Xiong et al. 2021 (Nystromformer; github.com/mlpen/Nystromformer
  LRA/code/lra_config.py), also used by the Skyformer re-runs (Chen et al. 2021): 2 layers, emb 64, 2 heads, qkv 64,
  MLP 128, dropout 0.1, learned positions, mean pooling, Adam lr 1e-4 without weight decay (`SMALL_MODEL` /
  `SMALL_TRAIN` below).
  Each task file states its own steps, batch, warmup and length. Published Transformer under it: 37.1 / 65.0 / 79.4 /
  38.2 / 74.2 (ListOps / Text / Retrieval / Image / Pathfinder).
- `pretrain=masked` / `pretrain=causal`: self-pretraining (Amos et al., "Never Train from Scratch", ICLR 2024) on the
  task's own training inputs before fine-tuning, in the same run (`config.pretrain`, lra/training/pretrain.py): as
  many pretraining steps as fine-tuning steps, at fine-tuning's peak learning rate and warmup; `pretrain=none`
  (default) trains from scratch. Any setting can follow on the command line (`--config.pretrain.steps=2000`).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import itertools
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
from kernels.common import DTYPE_NAMES

# The skeleton every config starts from; config files pass only what differs.
MODEL = dict(remat=False, reversible=False, post_ln=False, dtype="float32", patch_size=1)
DATA = dict(cache_dir="~/.cache/efficient_attention")
TRAIN = dict(batch_size=32, optimizer="adamw", schedule="cosine", weight_decay=0.0, b1=0.9, b2=0.98, eps=1e-9,
             grad_clip_norm=None, log_every_steps=50, num_eval_batches=None, keep_checkpoints=3)
# Self-pretraining ("Never Train from Scratch", Amos et al. 2024; lra/training/pretrain.py): off unless steps > 0.
# Batch size, optimizer moments, clipping and intervals come from `config.train`.
PRETRAIN = dict(objective="masked", steps=0, learning_rate=1e-3, schedule="cosine", warmup_steps=0, mask_rate=0.15,
                mask_token=0, tie_embeddings=True)
PRETRAIN_OBJECTIVES = ("none", "masked", "causal")  # the `pretrain=` config argument ("none": from scratch)
# Fields that may be None: typed references so that `--config.train.grad_clip_norm=1.0` parses as a float.
_OPTIONAL_TYPES = {"data_dir": str, "grad_clip_norm": float, "num_eval_batches": int, "num_workers": int,
                   "init_from": str}
encoder_owned_options = attention_lib.encoder_owned_options


# ----------------------------------------------------------------------------------------------------------------------
# Config files: skeleton, arguments, learning-rate x warmup grids.


def _typed(key: str, value: Any) -> Any:
  if value is None and key in _OPTIONAL_TYPES:
    return ml_collections.FieldReference(None, field_type=_OPTIONAL_TYPES[key])
  if key == "grad_clip_norm":  # a number that may later be set to None
    return ml_collections.FieldReference(value, field_type=float)
  if isinstance(value, Mapping):
    return ml_collections.ConfigDict({k: _typed(k, v) for k, v in value.items()})
  return value


def make_config(task: str, *, model: Mapping[str, Any], data: Mapping[str, Any], train: Mapping[str, Any],
                attention: str = "softmax", data_dir: bool = True, seed: int = 0) -> ml_collections.ConfigDict:
  """The skeleton with `model` / `data` / `train` merged over `MODEL` / `DATA` / `TRAIN`.

  `data_dir=True` adds `config.data.data_dir` (None: generate or fetch); `eval_batch_size` defaults to `batch_size`
  and `checkpoint_every_steps` to `eval_every_steps`.
  """
  model_fields = {**MODEL, **model}
  if model_fields["dtype"] not in DTYPE_NAMES:  # the one vocabulary (kernels/common.py); "auto": bf16 on accelerators
    raise ValueError(f"model dtype {model_fields['dtype']!r}: valid choices {DTYPE_NAMES}; pass one of them as "
                     f"make_config(model=dict(dtype=...))")
  data_fields = {**({"data_dir": None} if data_dir else {}), **DATA, **data}
  train_fields = {**TRAIN, **train}
  train_fields.setdefault("eval_batch_size", train_fields["batch_size"])
  train_fields.setdefault("checkpoint_every_steps", train_fields["eval_every_steps"])
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = seed
  config.model = _typed("model", model_fields)
  config.model.attention = attention_config(attention)
  config.data = _typed("data", data_fields)
  config.train = _typed("train", train_fields)
  # mesh.sequence: devices along the "sequence" axis (context parallelism, docs/clusters.md); data=-1 takes the rest.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, sequence=1, distributed="auto"))
  config.pretrain = ml_collections.ConfigDict(PRETRAIN)
  config.init_from = _typed("init_from", None)  # a workdir or checkpoint of another run: its encoder starts this one
  return config


# ----------------------------------------------------------------------------------------------------------------------
# Named LRA protocols and self-pretraining (the `protocol=` and `pretrain=` arguments of configs/lra/*.py).

PROTOCOLS = ("paper", "small")
# The small-model re-run protocol of Xiong et al. 2021 (Nystromformer, github.com/mlpen/Nystromformer
# LRA/code/lra_config.py), also used by the Skyformer re-runs (Chen et al. 2021): 2 layers, embedding 64, 2 heads
# of 32, FFN 128, dropout 0.1, learned positions, mean pooling; Adam at 1e-4, no weight decay, linear warmup then
# linear decay (here: cosine decay, the closest schedule this framework has).
SMALL_MODEL = dict(num_layers=2, emb_dim=64, num_heads=2, qkv_dim=64, mlp_dim=128, head_mlp_dim=128, dropout_rate=0.1,
                   attention_dropout_rate=0.1, pos_encoding="learned", pooling="mean")
SMALL_TRAIN = dict(learning_rate=1e-4, schedule="cosine", weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8)
# Published Transformer accuracy (%) under the small protocol (Xiong et al. 2021, Table 4):
# ListOps, Text, Retrieval, Image, Pathfinder.
SMALL_PUBLISHED_TRANSFORMER = (37.10, 65.02, 79.35, 38.20, 74.16)


def protocol_args(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The config arguments every LRA file accepts: runlocal, attention, protocol ("paper" | "small") and pretrain
  ("none" | "masked" | "causal"), plus the file's own `extra`."""
  return {"runlocal": False, "attention": "softmax", "protocol": "paper", "pretrain": "none", **dict(extra or {})}


def apply_protocol(config: ml_collections.ConfigDict, protocol: str, *, train: Mapping[str, Any] | None = None,
                   data: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`config` (the paper's) switched to `protocol`: "paper" leaves it; "small" sets `SMALL_MODEL`, `SMALL_TRAIN` and
  the task's own `train` / `data` settings of the re-run (steps, batch size, warmup, length)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol={protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
  if protocol == "small":
    config.model.update(SMALL_MODEL)
    config.train.update({**SMALL_TRAIN, **dict(train or {})})
    config.data.update(dict(data or {}))
  return config


def apply_pretrain(config: ml_collections.ConfigDict, objective: str, **settings: Any) -> ml_collections.ConfigDict:
  """Self-pretraining on (`objective` "masked" or "causal") or off ("none"): `settings` (steps, learning_rate, ...)
  over `PRETRAIN`. Without `steps`, pretraining runs as many steps as fine-tuning (Amos et al. pretrain at least as
  long as they fine-tune); the pretraining learning rate and warmup default to fine-tuning's."""
  if objective not in PRETRAIN_OBJECTIVES:
    raise ValueError(f"pretrain={objective!r}; valid choices: {', '.join(PRETRAIN_OBJECTIVES)}")
  if objective == "none":
    return config
  schedule = config.train.schedule if config.train.schedule != "rsqrt" else "cosine"
  fields = dict(objective=objective, steps=config.train.num_steps, learning_rate=_peak_rate(config.train),
                schedule=schedule, warmup_steps=min(config.train.warmup_steps, config.train.num_steps))
  config.pretrain.update({**fields, **settings})
  return config


def _peak_rate(train: ml_collections.ConfigDict) -> float:
  """The peak learning rate of `train`'s schedule (LRA's rsqrt schedule peaks at lr / sqrt(warmup))."""
  if train.schedule == "rsqrt":
    return float(train.learning_rate / max(train.warmup_steps, 1) ** 0.5)
  return float(train.learning_rate)


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


def lr_warmup_grid(train: ml_collections.ConfigDict, lr_factors: Sequence[float] = (0.5, 1.0, 2.0),
                   warmup_factors: Sequence[float] = (1, 5)) -> list[dict[str, Any]]:
  """`get_sweep()` points: learning rate x warmup steps, each a multiple of the config's own value."""
  return sweep_grid({
      "train.learning_rate": [train.learning_rate * f for f in lr_factors],
      "train.warmup_steps": [int(train.warmup_steps * f) for f in warmup_factors]})


def sweep_grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """The product of `{"dotted.config.key": [values...]}` as a list of override dicts (a config's `get_sweep()`)."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


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
