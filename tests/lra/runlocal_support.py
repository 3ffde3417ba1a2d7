"""Shared by the per-task tests: the attention variants every task's runlocal step runs with, and that step."""

from __future__ import annotations

import importlib

import ml_collections

from lra.training import train_and_evaluate
from lra.training.metric_writers import read_metrics

# Exact attention and one linear variant, as the LRA issue asks.
RUNLOCAL_ATTENTION = ("softmax", "linear")


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
