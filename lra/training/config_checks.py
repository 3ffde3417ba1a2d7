"""Checks a whole experiment config before any data is read or a model is built.

`check_config(config)` (also `validate_config`, its name before "validation" meant only the data split) walks one
declarative table, `RULES` (dotted key -> check), plus the attention options:
the registry gives each variant's option names and defaults, and each variant declares its options' ranges beside its
fields (`attention.option_ranges`), so a variant registered from outside the package is checked with no edit here.
Keys a config does not have are skipped and keys the table does not know (task-specific sections) pass, so every
task's config validates with the same table. All problems are reported together in one ValueError, each naming the
key, the value and the valid range.

`config_record(config)` is what `config.json` holds: the config plus `model.resolved_attention`, every layer's
attention options as `attention.resolve` decided them (exactly what runs; a record, not read back: a run reloaded from
its config.json resolves `model.attention` again).
`check_workdir_config(config, workdir)` compares that record with the `config.json` of a run it would resume, so a
workdir of another task or model is refused before training starts (`RESUMABLE_CHANGES` may differ).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections

import attention as attention_lib
from kernels.common import DTYPE_NAMES

# A check returns None when the value is fine, else what was expected ("an integer >= 1").
Check = Callable[[Any, ml_collections.ConfigDict], "str | None"]


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def integer(lo: int | None = None, hi: int | None = None, *, allow_none: bool = False) -> Check:
  """An int in [lo, hi] (either bound may be open-ended)."""
  expected = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "") + (
      f" in [{lo}, {hi}]" if lo is not None and hi is not None else "") + (" or None" if allow_none else "")

  def check(value, config):
    del config
    if value is None and allow_none:
      return None
    ok = _is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    return None if ok else expected
  return check


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
         allow_none: bool = False) -> Check:
  """A finite number in the interval given by lo/hi and whether each end is open."""
  if lo is not None and hi is not None:
    expected = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  elif lo is not None:
    expected = f"a number {'>' if lo_open else '>='} {lo}"
  else:
    expected = "a number"
  expected += " or None" if allow_none else ""

  def check(value, config):
    del config
    if value is None and allow_none:
      return None
    if not _is_real(value):
      return expected
    if lo is not None and (value <= lo if lo_open else value < lo):
      return expected
    if hi is not None and (value >= hi if hi_open else value > hi):
      return expected
    return None
  return check


def choice(options: Callable[[], tuple] | tuple) -> Check:
  """One of `options` (a tuple, or a function giving it, so registries are read when the check runs)."""
  def check(value, config):
    del config
    valid = tuple(options() if callable(options) else options)
    return None if value in valid else f"one of {', '.join(repr(v) for v in valid)}"
  return check


def boolean(value: Any, config: ml_collections.ConfigDict) -> str | None:
  del config
  return None if isinstance(value, bool) else "True or False"


def _warmup(value: Any, config: ml_collections.ConfigDict) -> str | None:
  num_steps = config.train.get("num_steps")
  if not _is_int(value) or value < 0:
    return "an integer >= 0"
  # The rsqrt schedule (LRA's) may warm up for longer than the run: LRA Retrieval uses 8,000 for 5,000 steps.
  if config.train.get("schedule") != "rsqrt" and _is_int(num_steps) and num_steps >= 1 and value > num_steps:
    return f"an integer in [0, train.num_steps={num_steps}]"
  return None


def _tasks() -> tuple[str, ...]:
  from lra import tasks  # pylint: disable=g-import-not-at-top  (tasks import the models; only needed here)
  return tuple(tasks.names())


def _schedules() -> tuple[str, ...]:
  from lra.training import optim  # pylint: disable=g-import-not-at-top
  return tuple(optim.SCHEDULES)


def _optimizers() -> tuple[str, ...]:
  from lra.training import optim  # pylint: disable=g-import-not-at-top
  return tuple(optim.OPTIMIZERS)


def _pos_encodings() -> tuple[str, ...]:
  from lra.models import embeddings  # pylint: disable=g-import-not-at-top
  return tuple(embeddings.POSITIONAL_ENCODINGS)


def _poolings() -> tuple[str, ...]:
  from lra.models import encoder  # pylint: disable=g-import-not-at-top
  return tuple(encoder.POOLINGS)


def _mesh_data(value: Any, config: ml_collections.ConfigDict) -> str | None:
  del config
  return None if _is_int(value) and (value == -1 or value >= 1) else "-1 (all devices) or an integer >= 1"


def _objectives() -> tuple[str, ...]:
  from lra.models import heads  # pylint: disable=g-import-not-at-top
  return tuple(heads.OBJECTIVES)


def _pretrain_warmup(value: Any, config: ml_collections.ConfigDict) -> str | None:
  steps = config.pretrain.get("steps")
  if not _is_int(value) or value < 0:
    return "an integer >= 0"
  if config.pretrain.get("schedule") != "rsqrt" and _is_int(steps) and steps >= 1 and value > steps:
    return f"an integer in [0, pretrain.steps={steps}]"
  return None


def _init_from(value: Any, config: ml_collections.ConfigDict) -> str | None:
  if value is None:
    return None
  if not isinstance(value, str) or not value:
    return "None or the path of another run's workdir or checkpoint"
  if _is_int(config.get("pretrain", {}).get("steps")) and config.pretrain.steps > 0:
    return "None when pretrain.steps > 0 (a run either pretrains its encoder or loads one; set one of the two)"
  return None


DTYPES = DTYPE_NAMES  # the one dtype vocabulary (kernels/common.py)

# The table: dotted key -> check. A key missing from a config is skipped (not every task has every field).
RULES: dict[str, Check] = {
    "task": choice(_tasks),
    "seed": integer(0),
    "model.num_layers": integer(1),
    "model.emb_dim": integer(1),
    "model.num_heads": integer(1),
    "model.qkv_dim": integer(1),
    "model.mlp_dim": integer(1),
    "model.head_mlp_dim": integer(1),
    "model.dropout_rate": real(0.0, 1.0, hi_open=True),
    "model.attention_dropout_rate": real(0.0, 1.0, hi_open=True),
    "model.pos_encoding": choice(_pos_encodings),
    "model.patch_size": integer(1),
    "model.pooling": choice(_poolings),
    "model.dtype": choice(DTYPES),
    "model.remat": boolean,
    "model.reversible": boolean,
    "model.post_ln": boolean,
    "model.tie_embeddings": boolean,
    "model.attention.name": choice(attention_lib.names),
    "data.max_length": integer(1),
    "data.resolution": integer(1),
    "data.validation_fraction": real(0.0, 1.0, lo_open=True, hi_open=True),
    "train.num_steps": integer(1),
    "train.batch_size": integer(1),
    "train.eval_batch_size": integer(1),
    "train.optimizer": choice(_optimizers),
    "train.learning_rate": real(0.0, lo_open=True),
    "train.schedule": choice(_schedules),
    "train.warmup_steps": _warmup,
    "train.weight_decay": real(0.0),
    "train.b1": real(0.0, 1.0, hi_open=True),
    "train.b2": real(0.0, 1.0, hi_open=True),
    "train.eps": real(0.0, lo_open=True),
    "train.grad_clip_norm": real(0.0, lo_open=True, allow_none=True),
    "train.log_every_steps": integer(1),
    "train.eval_every_steps": integer(1),
    "train.checkpoint_every_steps": integer(1),
    "train.keep_checkpoints": integer(1),
    "train.num_eval_batches": integer(1, allow_none=True),
    "pretrain.objective": choice(_objectives),
    "pretrain.steps": integer(0),
    "pretrain.learning_rate": real(0.0, lo_open=True),
    "pretrain.schedule": choice(_schedules),
    "pretrain.warmup_steps": _pretrain_warmup,
    "pretrain.mask_rate": real(0.0, 1.0, lo_open=True),
    "pretrain.mask_token": integer(0),
    "pretrain.tie_embeddings": boolean,
    "init_from": _init_from,
    "mesh.data": _mesh_data,
    "mesh.sequence": integer(1),
    "mesh.distributed": choice(("auto", True, False, "true", "false")),
}

def _lookup(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      return False, None
    node = node[part]
  return True, node


def _type_problem(value: Any, default: Any) -> str | None:
  """Whether `value` has the type of the registry default (None defaults accept anything)."""
  if default is None or default is dataclasses.MISSING:
    return None
  if isinstance(default, bool):
    return None if isinstance(value, bool) else "True or False"
  if isinstance(default, int):
    return None if _is_int(value) else "an integer"
  if isinstance(default, float):
    return None if _is_real(value) else "a number"
  if isinstance(default, str):
    return None if isinstance(value, str) else "a string"
  if isinstance(default, (tuple, list)):
    return None if isinstance(value, (tuple, list)) else "a tuple"
  return None


def _option_problems(name: str, given: Mapping[str, Any], where: str) -> list[str]:
  """Problems of the options `given` (a mapping the user wrote at `where`, e.g. `config.model.attention`) of
  variant `name`: model-owned or unknown options, values outside their declared range (`attention.option_ranges`),
  and for options without one, a type other than the registry default's."""
  defaults = attention_lib.options(name)
  owned = attention_lib.encoder_owned_options()
  ranges = attention_lib.option_ranges(name)
  problems = []
  for key in sorted(k for k in given.keys() if k != "name"):
    value = given[key]
    if key in owned:
      problems.append(f"{where}.{key}={value!r}: set by the encoder from config.model; remove it from {where}")
    elif key not in defaults:
      valid = sorted(k for k in defaults if k not in owned)
      problems.append(f"{where}.{key}: unknown option for attention {name!r}; valid options: {', '.join(valid)}")
    else:
      expected = (None if ranges[key].contains(value) else ranges[key].describe()) if key in ranges else \
          _type_problem(value, defaults[key])
      if expected is not None:
        problems.append(f"{where}.{key}={value!r} is out of range for {name!r}: expected {expected}")
  return problems


def _attention_problems(config: ml_collections.ConfigDict) -> list[str]:
  found, sub = _lookup(config, "model.attention")
  if not found or not isinstance(sub, (ml_collections.ConfigDict, Mapping)):
    return []
  name = sub.get("name")
  if name not in attention_lib.names():
    return []  # reported by RULES["model.attention.name"]
  problems = _option_problems(name, sub, "config.model.attention")
  _, layer_options = _lookup(config, "model.layer_options")
  for i, layer in enumerate(layer_options or ()):
    if not isinstance(layer, (ml_collections.ConfigDict, Mapping)):
      problems.append(f"config.model.layer_options[{i}]={layer!r}: expected a mapping of attention options")
    else:
      problems += _option_problems(name, layer, f"config.model.layer_options[{i}]")
  _, num_layers = _lookup(config, "model.num_layers")
  # What only the whole resolution tells (required options, one entry per layer), once the parts are fine.
  if not problems and _is_int(num_layers) and num_layers >= 1:
    try:
      resolved_layers(config)
    except ValueError as e:
      problems.append(f"config.model.attention: {e}")
  return problems


def resolved_layers(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], ...]:
  """The options of every attention layer of `config`'s model (`attention.resolve` over `config.model.attention`,
  `config.model.num_layers` and `config.model.layer_options`)."""
  sub = dict(config.model.attention.items())
  layer_options = config.model.get("layer_options")
  return attention_lib.resolve(sub.pop("name"), config.model.get("num_layers", 1), sub,
                               layer_options=None if layer_options is None else [dict(o) for o in layer_options])


RESOLVED_ATTENTION = "resolved_attention"


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config` as the dict `config.json` holds: `model.attention` keeps the options the user set and
  `model.resolved_attention` records every layer's options as they run (`{"name": ..., **options}` per layer; a
  record only: the model is always built from `model.attention`, so a stale record cannot change it)."""
  record = config.to_dict()
  model = record.get("model")
  if isinstance(model, dict) and isinstance(model.get("attention"), dict) and "name" in model["attention"]:
    name = model["attention"]["name"]
    model[RESOLVED_ATTENTION] = [{"name": name, **o} for o in resolved_layers(config)]
  return record


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem found in `config`, one line each (empty when the config is valid)."""
  problems = []
  for key, check in RULES.items():
    found, value = _lookup(config, key)
    if not found:
      continue
    expected = check(value, config)
    if expected is not None:
      problems.append(f"config.{key}={value!r} is out of range: expected {expected}")
  problems += _attention_problems(config)
  return problems


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing every out-of-range value or invalid choice in `config` (see `RULES`)."""
  problems = config_problems(config)
  if problems:
    raise ValueError("invalid config: " + "; ".join(problems))


validate_config = check_config  # the name before "validation" meant only the data split


# Keys a resumed run may change: how long it runs and how often it reports, where data lives, the device mesh, and
# implementation choices that do not change the model (same parameters, same math).
RESUMABLE_CHANGES = ("train.num_steps", "train.log_every_steps", "train.eval_every_steps",
                     "train.checkpoint_every_steps", "train.keep_checkpoints", "train.num_eval_batches",
                     "train.eval_batch_size", "data.data_dir", "data.cache_dir", "mesh", "model.remat",
                     "model.attention.implementation")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):  # one entry per layer
      for i, v in enumerate(value):
        out.update(_flatten(v, f"{prefix}{key}.{i}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  # The same record and round trip config.json went through (tuples become lists, odd objects strings).
  return json.loads(json.dumps(config_record(config), default=str))


def config_differences(saved: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """Keys present in both that differ, outside `RESUMABLE_CHANGES`, as `key: saved -> now` lines."""
  old, new = _flatten(saved), _flatten(_as_json(config))
  def allowed(key: str) -> bool:
    key = re.sub(rf"^model\.{RESOLVED_ATTENTION}\.\d+\.", "model.attention.", key)  # a layer's: as the variant's
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)
  # Keys only one side has are not compared: configs gain fields over time, and shapes are checked separately.
  return [f"{key}: {old[key]!r} in the workdir, {new[key]!r} now" for key in sorted(set(old) & set(new))
          if old[key] != new[key] and not allowed(key)]


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str | Path, checkpoint_dir: str) -> None:
  """Raises ValueError when `workdir` holds checkpoints of a run whose `config.json` differs from `config` in a
  key that a resumed run may not change (task, model, data, optimizer...)."""
  workdir = Path(workdir)
  path = workdir / "config.json"
  if not path.exists() or not (workdir / checkpoint_dir).is_dir() or not any((workdir / checkpoint_dir).iterdir()):
    return
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it should be the config of the run in {workdir}") from None
  diffs = config_differences(saved, config)
  if diffs:
    shown = diffs[:8] + ([f"... and {len(diffs) - 8} more"] if len(diffs) > 8 else [])
    raise ValueError(f"--workdir {workdir} holds a run of another config ({'; '.join(shown)}); resuming would mix "
                     f"them. Use a new --workdir for this config (only {', '.join(RESUMABLE_CHANGES[:4])}, ... may "
                     f"change on resume)")
