r"""Runs one config with several attention variants side by side (same seed, data and step budget) and prints a
table: the task's validation / test metrics, parameter count and training steps/s (as Tables 1-2 of "Attention Is
Not What You Need" compare a Transformer with the Grassmann layer).

  python scripts/compare.py --config configs/wikitext2.py:runlocal --attention=softmax,grassmann \
      --workdir runs/compare_wt2 --config.data.data_dir=../shared/data/wikitext-2
  python scripts/compare.py --config configs/lra/listops.py:runlocal --attention=softmax,linear,performer \
      --workdir runs/compare_listops

Each variant trains in `<workdir>/<variant>` (finished runs are reused, interrupted ones resume); the table is also
written to `<workdir>/compare.md` and `<workdir>/compare.csv`.
"""

from __future__ import annotations

import copy
import csv
import logging as std_logging
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from configs import common
from lra.training import Experiment, train_and_evaluate
from lra.training.metric_writers import read_metrics
from lra.training.trainer import STEPS_PER_SECOND

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.", lock_config=False)
_ATTENTION = flags.DEFINE_list("attention", ["softmax", "grassmann"], "Registered attention variants to compare.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for one run per variant and the table.")
flags.mark_flags_as_required(["config", "workdir"])


def parameter_count(config) -> int:
  exp = Experiment(config)
  shapes = jax.eval_shape(exp.init_state)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes.params)))


def summarize(config, workdir: Path, name: str) -> dict:
  records = read_metrics(workdir)
  rates = [r[STEPS_PER_SECOND] for r in records if r["split"] == "train" and STEPS_PER_SECOND in r]
  row = {"attention": name, "parameters": parameter_count(config),
         # The first log interval includes compilation.
         "steps/s": float(np.median(rates[1:] if len(rates) > 1 else rates)) if rates else float("nan")}
  last_step = max(r["step"] for r in records)
  for record in records:
    if record["step"] == last_step and record["split"] != "train":
      for key, value in record.items():
        if key not in ("step", "split"):
          row[f"{record['split']} {key}"] = value
  return row


def markdown(rows: list[dict]) -> str:
  columns = list(dict.fromkeys(k for r in rows for k in r))
  fmt = lambda v: f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  for noisy in ("absl", "jax"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  base, workdir = _CONFIG.value, Path(_WORKDIR.value)
  rows = []
  for name in _ATTENTION.value:
    config = copy.deepcopy(base)
    config.model.attention = common.attention_config(name)
    train_and_evaluate(config, workdir / name)
    rows.append(summarize(config, workdir / name, name))
  table = markdown(rows)
  print(table)
  (workdir / "compare.md").write_text(table + "\n")
  with open(workdir / "compare.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)


if __name__ == "__main__":
  app.run(main)
