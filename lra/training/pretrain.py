"""Self-pretraining ("Never Train from Scratch", Amos et al., ICLR 2024) and `init_from`: how fine-tuning starts.

`config.pretrain` (configs/common.py, `PRETRAIN`): `objective` "masked" (BERT-style denoising of the task's own
tokens, bidirectional) or "causal" (next token), `steps` (0 = no pretraining, the default), `learning_rate`,
`schedule`, `warmup_steps`, `mask_rate`, `mask_token`, `tie_embeddings`; everything else (batch size, optimizer
moments, clipping, intervals) is `config.train`'s. With `steps > 0`, one `train.py` call runs two phases on the task's
own training inputs:

  1. "pretrain": the task's encoder with `sequence_output=True` (the same parameters as the classifier's encoder)
     under `lra.models.heads.SelfPretrainingModel`, trained for `pretrain.steps` on the token sequences the task's
     `pretrain_token_keys()` names (Retrieval: both documents through its one encoder); labels are never read;
  2. "finetune": the task's own model, whose `params["encoder"]` start from the last pretraining step (the head
     starts from `config.seed`'s initialisation), trained for `train.num_steps` as any run.

Workdir layout (the fine-tuning phase keeps the layout of a run without pretraining):
  <workdir>/config.json                        the whole config, `pretrain` section included
  <workdir>/metrics.jsonl                      both phases; with pretraining every row has `"phase"`: "pretrain" or
                                               "finetune" (each phase counts its own steps from 1)
  <workdir>/pretrain/checkpoints, /best        the pretraining phase's checkpoints (best: lowest validation loss);
  <workdir>/pretrain/config.json               its effective config (train section = the pretraining settings)
  <workdir>/checkpoints, <workdir>/best        fine-tuning's, as without pretraining

Resume across the phase boundary: a fine-tuning checkpoint means pretraining is over (it is not read again);
otherwise the pretraining phase resumes from its latest checkpoint exactly as any run (trainer.py's resume order),
and once it has reached `pretrain.steps` its last state seeds fine-tuning. A kill anywhere therefore resumes to the
same parameters and metrics as an uninterrupted run.

`config.init_from`: a workdir (its fine-tuning checkpoints, else its pretraining checkpoints), a checkpoint folder
or one step folder of another run; its `params["encoder"]` start this run's fine-tuning. Shapes must match: a
mismatch is one ValueError naming the differing arrays.

This module holds what the pretraining phase is made of (its config, task, model, metric rows, encoder transfer);
trainer.py owns the phases and runs both with one setup (`trainer.run_phase`). The dependency runs one way:
trainer -> pretrain.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from lra.models.heads import SelfPretrainingModel
from lra.tasks import causal_lm
from lra.training import checkpoints as checkpoints_lib
from lra.training import metric_writers

PRETRAIN_DIR = "pretrain"
PRETRAIN_CHECKPOINTS = f"{PRETRAIN_DIR}/{checkpoints_lib.LATEST_DIR}"
PHASES = ("pretrain", "finetune")
# config.pretrain keys that replace config.train's in the pretraining phase.
_TRAIN_KEYS = {"steps": "num_steps", "learning_rate": "learning_rate", "schedule": "schedule",
               "warmup_steps": "warmup_steps"}
ENCODER = "encoder"


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` has a pretraining phase (`config.pretrain.steps > 0`)."""
  pretrain = config.get("pretrain")
  return pretrain is not None and int(pretrain.get("steps") or 0) > 0


def finetune_phase(config: ml_collections.ConfigDict) -> str | None:
  """The `phase` label of fine-tuning rows: "finetune" when the run has a pretraining phase, else None (no label)."""
  return "finetune" if enabled(config) else None


def phase_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config the pretraining phase trains with: `config.train` with `config.pretrain`'s steps and schedule."""
  out = copy.deepcopy(config)
  out.unlock()
  for key, train_key in _TRAIN_KEYS.items():
    out.train[train_key] = config.pretrain[key]
  return out


def pretraining_model(task: Any, config: ml_collections.ConfigDict) -> SelfPretrainingModel:
  """The task's own encoder (its model's `encoder` field, all sizes as configured) under the pretraining head."""
  encoder = getattr(task.model(), ENCODER, None)
  if encoder is None:
    raise ValueError(f"task {config.task!r} has no `encoder` in its model; self-pretraining needs one")
  pretrain = config.pretrain
  encoder = encoder.clone(sequence_output=True, causal=pretrain.objective == "causal")
  return SelfPretrainingModel(encoder=encoder, vocab_size=encoder.vocab_size,
                              token_keys=tuple(task.pretrain_token_keys()), objective=pretrain.objective,
                              mask_rate=pretrain.mask_rate, mask_token=pretrain.mask_token,
                              tie_embeddings=pretrain.tie_embeddings)


class PretrainTask:
  """The task seen by the pretraining phase: the task's splits and inputs, a token-prediction model and loss.

  Duck-types `lra.tasks.base.Task` for the trainer: validation loss selects the best pretraining checkpoint, and only
  the validation split is evaluated (token loss and accuracy of the objective)."""

  best_metric = "loss"
  best_mode = "min"

  def __init__(self, task: Any, config: ml_collections.ConfigDict):
    self.base = task
    self.config = config
    self.name = f"{task.name}_pretrain"
    self.train_split = task.train_split
    self.validation_split = task.validation_split
    self.eval_splits = (task.validation_split,)

  def dataset(self, split: str):
    return self.base.dataset(split)

  def model(self) -> SelfPretrainingModel:
    return pretraining_model(self.base, self.config)

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    return self.base.dummy_batch(batch_size)

  def loss_and_metrics(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]):
    del batch  # the targets and weights are the model's (per-example weights already folded in)
    loss, metrics = causal_lm.token_loss_and_metrics(outputs["logits"], {"targets": outputs["targets"]},
                                                     outputs["weights"])
    return loss, {"loss": metrics["loss"], "token_accuracy": metrics["accuracy"]}

  def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    if "loss" in metrics:
      metrics = {**metrics, "perplexity": float(math.exp(min(metrics["loss"], 80.0)))}
    return metrics


class PhaseWriter(metric_writers.MetricWriter):
  """`MetricWriter` whose rows carry `"phase": phase` (and TensorBoard tags `<phase>/<split>/<name>`), and whose
  truncation on resume drops only its own phase's rows. `phase=None` writes and truncates as `MetricWriter`."""

  def __init__(self, workdir: Path, enabled: bool = True, phase: str | None = None):
    super().__init__(workdir, enabled=enabled)
    self.phase = phase

  def truncate_after(self, step: int) -> None:
    if not self.enabled or not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      if line.strip():
        record = json.loads(line)
        if record.get("phase") != self.phase or record["step"] <= step:
          kept.append(line)
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    if self.phase is None:
      super().write(step, split, metrics)
      return
    record = {"step": int(step), "split": split, "phase": self.phase, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in metrics.items():
      if math.isfinite(float(value)):
        self._tb.add_scalar(f"{self.phase}/{split}/{name}", float(value), step)
    self._tb.flush()


def phase_records(records: list[dict], phase: str = "finetune") -> list[dict]:
  """The metrics.jsonl rows of one phase (rows without a label belong to fine-tuning: runs without pretraining)."""
  return [r for r in records if r.get("phase", "finetune") == phase]


def load_init_from(path: str) -> tuple[Any, Path]:
  """The encoder params of the run at `path` (see `checkpoints.step_directory`) and the step folder read."""
  params, directory = checkpoints_lib.read_params(path)
  if ENCODER not in params:
    raise ValueError(f"config.init_from={path}: the checkpoint {directory} has no encoder parameters (top-level "
                     f"entries: {sorted(params)})")
  return params[ENCODER], directory


def with_encoder(state: Any, encoder_params: Any, source: str) -> Any:
  """`state` with `params["encoder"]` replaced by `encoder_params` (cast to the model's dtypes, placed with its
  shardings); ValueError naming the arrays whose shapes differ."""
  target = state.params[ENCODER]
  diffs = checkpoints_lib.tree_differences({ENCODER: encoder_params}, {ENCODER: target})
  if diffs:
    raise ValueError(f"{source}: its encoder does not fit this model ({'; '.join(diffs)}); the encoder config "
                     f"(layers, widths, vocabulary, max_length, pooling, attention parameters) must match")
  placed = jax.tree.map(lambda t, s: jax.device_put(np.asarray(s, dtype=t.dtype), t.sharding), target, encoder_params)
  return state.replace(params={**state.params, ENCODER: placed})
