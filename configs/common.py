"""What every config file shares: the config skeleton (`make_config` over `MODEL`, `DATA`, `TRAIN`, `PRETRAIN`), the
named LRA protocols, self-pretraining settings and sweep grids. The command-line and arg-string machinery (strict
`key=value` arguments, the attention sub-config, dotted overrides, the `--config` flag) is configs/command_line.py,
whose names are re-exported here.

A config file calls `make_config(task, model=..., data=..., train=...)` with only what differs from the skeleton
(`MODEL`, `DATA`, `TRAIN` below). The attention sub-config holds the variant's name and exactly the options the user
set (the config file's and the command line's); nothing fills in defaults here: `attention.resolve` decides every
layer's options when the model is built (registry defaults, the variant's per-layer schedule, then what the user
set, which always wins, even when it equals a default). Switching the variant is one assignment:

  --config.model.attention.name=performer --config.model.attention.num_features=128

works from every config (`DEFINE_config_file`, configs/command_line.py, handles the command line; `apply_overrides` does the same for
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

import itertools
from typing import Any, Mapping, Sequence

import ml_collections

from configs import command_line
# The command-line and arg-string machinery lives in configs/command_line.py; its names stay importable from here
# (config files call `common.parse_arg`, entry points `common.DEFINE_config_file`, sweeps `common.apply_overrides`).
from configs.command_line import (ATTENTION, DEFINE_config_file, apply_overrides,  # noqa: F401
                                  attention_config, attention_options, encoder_owned_options, load_config_file,
                                  load_module, parse_arg, parse_override, prepare_for_command_line)
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


# ----------------------------------------------------------------------------------------------------------------------
# Config files: the skeleton.


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
