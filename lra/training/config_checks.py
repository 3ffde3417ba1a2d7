"""Checks a whole experiment config before any data is read or a model is built.

`check_config(config)` (also `validate_config`, its name before "validation" meant only the data split) walks one
declarative table, `RULES` (dotted key -> a range of the one vocabulary, attention/ranges.py, or a rule reading other
keys), plus the attention options, which are checked by the one gate (`attention.resolve`: each variant declares its
options' ranges beside its fields) and only formatted here, so a variant registered from outside the package is
checked with no edit here.
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
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import ml_collections

import attention as attention_lib
from attention.ranges import Boolean, Integer, OneOf, Range, Real, Satisfies
from kernels.common import DTYPE_NAMES

# A rule is a range of the one vocabulary (attention/ranges.py: what the attention options use too), or, for rules
# that read other keys, a function returning None when the value is fine, else what was expected ("an integer >= 1").
Check = Callable[[Any, ml_collections.ConfigDict], "str | None"]
Rule = Union[Range, Check]


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


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


_MESH_DATA = Satisfies(lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 (all devices) or an integer >= 1")


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


# The table: dotted key -> check. A key missing from a config is skipped (not every task has every field).
RULES: dict[str, Rule] = {
    "task": OneOf(_tasks),
    "seed": Integer(0),
    "model.num_layers": Integer(1),
    "model.emb_dim": Integer(1),
    "model.num_heads": Integer(1),
    "model.qkv_dim": Integer(1),
    "model.mlp_dim": Integer(1),
    "model.head_mlp_dim": Integer(1),
    "model.dropout_rate": Real(0.0, 1.0, hi_open=True),
    "model.attention_dropout_rate": Real(0.0, 1.0, hi_open=True),
    "model.pos_encoding": OneOf(_pos_encodings),
    "model.patch_size": Integer(1),
    "model.pooling": OneOf(_poolings),
    "model.dtype": OneOf(DTYPE_NAMES),
    "model.remat": Boolean(),
    "model.reversible": Boolean(),
    "model.post_ln": Boolean(),
    "model.tie_embeddings": Boolean(),
    "model.attention.name": OneOf(attention_lib.names),
    "data.max_length": Integer(1),
    "data.resolution": Integer(1),
    "data.validation_fraction": Real(0.0, 1.0, lo_open=True, hi_open=True),
    "train.num_steps": Integer(1),
    "train.batch_size": Integer(1),
    "train.eval_batch_size": Integer(1),
    "train.optimizer": OneOf(_optimizers),
    "train.learning_rate": Real(0.0, lo_open=True),
    "train.schedule": OneOf(_schedules),
    "train.warmup_steps": _warmup,
    "train.weight_decay": Real(0.0),
    "train.b1": Real(0.0, 1.0, hi_open=True),
    "train.b2": Real(0.0, 1.0, hi_open=True),
    "train.eps": Real(0.0, lo_open=True),
    "train.grad_clip_norm": Real(0.0, lo_open=True, allow_none=True),
    "train.log_every_steps": Integer(1),
    "train.eval_every_steps": Integer(1),
    "train.checkpoint_every_steps": Integer(1),
    "train.keep_checkpoints": Integer(1),
    "train.num_eval_batches": Integer(1, allow_none=True),
    "pretrain.objective": OneOf(_objectives),
    "pretrain.steps": Integer(0),
    "pretrain.learning_rate": Real(0.0, lo_open=True),
    "pretrain.schedule": OneOf(_schedules),
    "pretrain.warmup_steps": _pretrain_warmup,
    "pretrain.mask_rate": Real(0.0, 1.0, lo_open=True),
    "pretrain.mask_token": Integer(0),
    "pretrain.tie_embeddings": Boolean(),
    "init_from": _init_from,
    "mesh.data": _MESH_DATA,
    "mesh.sequence": Integer(1),
    "mesh.distributed": OneOf(("auto", True, False, "true", "false")),
}


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      return False, None
    node = node[part]
  return True, node


# The config key of each model-owned attention option a constraint may name (attention/specs.py: where="model").
_MODEL_KEYS = {"num_heads": "num_heads", "qkv_dim": "qkv_dim", "dropout_rate": "attention_dropout_rate",
               "positions": "pos_encoding", "dtype": "dtype"}


def _format(problem: attention_lib.registry.Problem, name: str) -> str:
  """One of the gate's problems as a config line, named by the key the user wrote."""
  if problem.where == "model":
    return (f"config.model.{_MODEL_KEYS.get(problem.option, problem.option)}={problem.value!r} is out of range for "
            f"attention {name!r}: expected {problem.expected}")
  where = "config.model." + (problem.where or "attention")
  key, value = problem.option, problem.value
  if problem.kind == "owned":
    return f"{where}.{key}={value!r}: set by the encoder from config.model; remove it from {where}"
  if problem.kind == "unknown":
    return f"{where}.{key}: unknown option for attention {name!r}; valid options: {problem.expected}"
  return f"{where}.{key}={value!r} is out of range for {name!r}: expected {problem.expected}"


def _attention_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The gate's answer (`attention.resolve`) for `config.model.attention` and `config.model.layer_options`,
  formatted with the config's key paths; nothing is checked here."""
  found, sub = _lookup(config, "model.attention")
  if not found or not isinstance(sub, (ml_collections.ConfigDict, Mapping)):
    return []
  name = sub.get("name")
  if name not in attention_lib.names():
    return []  # reported by RULES["model.attention.name"]
  _, layer_options = _lookup(config, "model.layer_options")
  problems = [f"config.model.layer_options[{i}]={layer!r}: expected a mapping of attention options"
              for i, layer in enumerate(layer_options or ())
              if not isinstance(layer, (ml_collections.ConfigDict, Mapping))]
  if problems:
    return problems
  _, num_layers = _lookup(config, "model.num_layers")
  try:
    specs = resolved_layers(config)
  except attention_lib.OptionError as e:
    return [_format(p, name) for p in e.problems]
  except ValueError as e:
    if _is_int(num_layers) and num_layers >= 1:  # a bad num_layers is reported by RULES
      return [f"config.model.attention: {e}"]
    return []
  return _model_constraint_problems(config, specs, layer_options)


def _encoder_causalities(config: ml_collections.ConfigDict) -> tuple[bool, ...]:
  """Whether the run's encoders are causal: a language-model task's is; causal pretraining adds a causal phase."""
  from lra import tasks  # pylint: disable=g-import-not-at-top  (tasks import the models; only needed here)
  from lra.tasks.causal_lm import LanguageModelTask  # pylint: disable=g-import-not-at-top
  task = config.get("task")
  causal = task in tasks.names() and issubclass(tasks.get(task), LanguageModelTask)
  pretrain = config.get("pretrain") or {}
  causal_pretraining = _is_int(pretrain.get("steps")) and pretrain.get("steps") > 0 and \
      pretrain.get("objective") == "causal"
  return tuple(dict.fromkeys((causal, True) if causal_pretraining else (causal,)))


def _model_constraint_problems(config: ml_collections.ConfigDict, specs: tuple[attention_lib.AttentionSpec, ...],
                               layer_options: Any) -> list[str]:
  """The gate's constraints that read a model-owned option (a bidirectional window is odd, RoPE's even head
  dimension: `attention.registry.constraint_problems`), asked with the values this config gives the model, so they
  are refused here, before any tracing, as the layers would be when built."""
  from lra.models import embeddings  # pylint: disable=g-import-not-at-top
  model = config.model
  owned = {"num_heads": model.get("num_heads", 8), "qkv_dim": model.get("qkv_dim"),
           "dropout_rate": model.get("attention_dropout_rate", 0.0),
           "positions": embeddings.layer_positions(model.get("pos_encoding", "learned"))}
  lines = []
  for causal in _encoder_causalities(config):
    for i, spec in enumerate(specs):
      for problem in attention_lib.registry.constraint_problems(spec, {**owned, "causal": causal}):
        if problem.where == "" and layer_options is not None and problem.option in layer_options[i]:
          problem = dataclasses.replace(problem, where=f"layer_options[{i}]")
        lines.append(_format(problem, spec.name))
  return list(dict.fromkeys(lines))


def resolved_layers(config: ml_collections.ConfigDict) -> tuple[attention_lib.AttentionSpec, ...]:
  """The `AttentionSpec` of every attention layer of `config`'s model (`attention.resolve` over
  `config.model.attention`, `config.model.num_layers` and `config.model.layer_options`): the gate's answer, computed
  once and shared with the model (`lra.models.encoder_from_config`)."""
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
    model[RESOLVED_ATTENTION] = [spec.record() for spec in resolved_layers(config)]
  return record


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem found in `config`, one line each (empty when the config is valid)."""
  problems = []
  for key, rule in RULES.items():
    found, value = _lookup(config, key)
    if not found:
      continue
    if isinstance(rule, Range):
      expected = None if rule.contains(value) else rule.describe()
    else:
      expected = rule(value, config)
    if expected is not None:
      problems.append(f"config.{key}={value!r} is out of range: expected {expected}")
  problems += _attention_problems(config)
  if not problems:
    problems += _sequence_parallel_problems(config)
  return problems


def _sequence_parallel_problems(config: ml_collections.ConfigDict) -> list[str]:
  """With `mesh.sequence > 1`, the layers' options their sequence-parallel form cannot honour (a layer's
  `sequence_parallel_refusal()`, e.g. softmax's explicit Pallas kernels under the ring): refused, never dropped."""
  found, size = _lookup(config, "mesh.sequence")
  if not found or not _is_int(size) or size <= 1:
    return []
  from lra.models import embeddings  # pylint: disable=g-import-not-at-top
  cls = attention_lib.get_class(config.model.attention.name)
  # The encoder-owned options a form may depend on (attention dropout, relative positions), as the encoder sets them.
  owned = {"num_heads": config.model.get("num_heads", 8), "qkv_dim": config.model.get("qkv_dim"),
           "dropout_rate": config.model.get("attention_dropout_rate", 0.0),
           "positions": embeddings.layer_positions(config.model.get("pos_encoding", "learned"))}
  problems = []
  for layer_options in resolved_layers(config):
    try:  # constructing a layer passes the gate (`AttentionLayer.__post_init__`), the model-owned values included
      layer = cls(**dict(layer_options), **owned)
    except ValueError as e:
      problems.append(f"config.model.attention: {e}")
      continue
    refusal = getattr(layer, "sequence_parallel_refusal", lambda: None)()
    if refusal is not None:
      refusal = refusal.replace("mesh.sequence > 1", f"config.mesh.sequence={size}", 1)
      problems.append(f"config.model.attention: {refusal}")
  return list(dict.fromkeys(problems))


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
