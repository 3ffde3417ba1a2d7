"""Shared by the per-task tests: the attention variants every task's runlocal step runs with, and that step."""

from __future__ import annotations

import importlib

import ml_collections

from lra.training import train_and_evaluate
from lra.training.metric_writers import read_metrics

# Exact attention and one linear variant, as the LRA issue asks: each task's runlocal step runs one of them (its
# runlocal config compiles and trains a step), alternating so that both train through every stage of the pipeline
# (data, model, loss, evaluation, checkpoints) across the tasks; each variant's layer itself is checked by the
# contract suite (tests/attention/test_contract.py). Linear where softmax would be quadratic in a long runlocal
# sequence (Path-X runlocal: 64 x 64 = 4,096 pixels).
RUNLOCAL_ATTENTION = ("softmax", "linear")
RUNLOCAL_ATTENTION_OF = {"text": "linear", "retrieval": "softmax", "image": "linear", "pathfinder": "softmax",
                         "pathx": "linear", "mqar": "softmax"}
assert set(RUNLOCAL_ATTENTION_OF.values()) == set(RUNLOCAL_ATTENTION)


def runlocal_config(task: str, attention_name: str, cache_dir, **data) -> ml_collections.ConfigDict:
  """configs/lra/<task>.py:runlocal with `attention`, its data from the test's fixture, two short training steps."""
  module = importlib.import_module(f"configs.lra.{task}")
  config = module.get_config(f"runlocal,attention={attention_name}")
  config.data.cache_dir = str(cache_dir)
  config.data.update(data)
  config.train.update(num_steps=2, batch_size=2, eval_batch_size=2, num_eval_batches=1, log_every_steps=1,
                      eval_every_steps=2, checkpoint_every_steps=2, warmup_steps=1)
  return config


def run_steps(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains and evaluates `config`; checks the workdir's metrics and returns the final metrics."""
  final = train_and_evaluate(config, workdir)
  train = [r for r in read_metrics(workdir) if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2]
  for split, metrics in final.items():
    assert 0.0 <= metrics["accuracy"] <= 1.0, (split, metrics)
  return final
