r"""Builds the LRA accuracy table from a folder of run workdirs: tasks as columns, attention variants as rows.

Each workdir (found at any depth) holds the `config.json` written by train.py and the `eval_test.json` written by
`python eval.py --workdir <workdir> --split test` (scripts/sweep.py writes both). Every cell shows our test accuracy
(%) with the published number of Tay et al. 2020 (Table 1) in parentheses; the average leaves out Path-X, as LRA's,
and results on synthetic stand-in data (marked †).
Where several runs share a task and variant (a sweep), the one with the best validation accuracy in its
`metrics.jsonl` is taken (never the best on test).

  python scripts/lra_table.py runs/                         # markdown and CSV to stdout
  python scripts/lra_table.py runs/ --format=csv --output=lra_table.csv
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from absl import app
from absl import flags

from lra import cli

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
TITLES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image", "pathfinder": "Path",
          "pathx": "Path-X"}
AVERAGED = ("listops", "text", "retrieval", "image", "pathfinder")  # LRA's average leaves out Path-X

# Tay et al. 2020 "Long Range Arena", Table 1: accuracy (%) on TASKS, None = FAIL; keyed by registered attention name.
PUBLISHED: dict[str, tuple[str, tuple[float | None, ...]]] = {
    "local": ("Local Attention", (15.82, 52.98, 53.39, 41.46, 66.63, None)),
    "linear": ("Linear Trans.", (16.13, 65.90, 53.09, 42.34, 75.30, None)),
    "reformer": ("Reformer", (37.27, 56.10, 53.40, 38.07, 68.50, None)),
    "sparse_transformer": ("Sparse Trans.", (17.07, 63.58, 59.59, 44.24, 71.71, None)),
    "sinkhorn": ("Sinkhorn Trans.", (33.67, 61.20, 53.83, 41.23, 67.45, None)),
    "linformer": ("Linformer", (35.70, 53.94, 52.27, 38.56, 76.34, None)),
    "performer": ("Performer", (18.01, 65.40, 53.82, 42.77, 77.05, None)),
    "synthesizer": ("Synthesizer", (36.99, 61.68, 54.67, 41.61, 69.45, None)),
    "longformer": ("Longformer", (35.63, 62.85, 56.89, 42.22, 69.71, None)),
    "softmax": ("Transformer", (36.37, 64.27, 57.46, 42.44, 71.40, None)),
    "bigbird": ("BigBird", (36.05, 64.02, 59.29, 40.83, 74.87, None)),
}

_FORMAT = flags.DEFINE_enum("format", "both", ["markdown", "csv", "both"], "Output format.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "Write here instead of stdout (with --format=both: <output>.md and <output>.csv).")
_SPLIT = flags.DEFINE_string("split", "test", "Reads eval_<split>.json.")


@dataclasses.dataclass
class Run:
  workdir: Path
  task: str
  variant: str
  accuracy: float  # percent
  validation: float | None  # best validation accuracy in metrics.jsonl (percent), for choosing among runs
  synthetic: bool  # trained on synthetic stand-in data (Retrieval runlocal)


def _best_validation(workdir: Path) -> float | None:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return None
  values = [r["accuracy"] for r in map(json.loads, path.read_text().splitlines())
            if r.get("split") == "validation" and "accuracy" in r]
  return 100 * max(values) if values else None


def find_runs(root: str | Path, split: str = "test") -> list[Run]:
  """Every workdir under `root` with a config.json of an LRA task and an eval_<split>.json."""
  runs = []
  for config_path in sorted(Path(root).rglob("config.json")):
    workdir = config_path.parent
    config = json.loads(config_path.read_text())
    eval_path = workdir / f"eval_{split}.json"
    if config.get("task") not in TASKS or not eval_path.exists():
      continue
    accuracy = json.loads(eval_path.read_text())["accuracy"]
    runs.append(Run(workdir, config["task"], config["model"]["attention"]["name"], 100 * accuracy,
                    _best_validation(workdir), bool(config.get("data", {}).get("synthetic"))))
  return runs


def select(runs: Sequence[Run]) -> dict[tuple[str, str], Run]:
  """One run per (variant, task): the best by validation accuracy (runs without one come last)."""
  chosen: dict[tuple[str, str], Run] = {}
  for run in runs:
    key = (run.variant, run.task)
    best = chosen.get(key)
    rank = lambda r: -math.inf if r.validation is None else r.validation  # noqa: E731
    if best is None or rank(run) > rank(best):
      chosen[key] = run
  return chosen


def _average(values: Sequence[float | None]) -> float | None:
  present = [v for v in values if v is not None]
  return sum(present) / len(present) if present else None


def rows(chosen: dict[tuple[str, str], Run]) -> list[dict]:
  """One dict per variant: ours and published accuracy per task, and their averages over AVERAGED."""
  variants = sorted({variant for variant, _ in chosen}, key=lambda v: (v not in PUBLISHED, v))
  out = []
  for variant in variants:
    title, published = PUBLISHED.get(variant, (variant, (None,) * len(TASKS)))
    row = {"variant": variant, "title": title, "cells": {}}
    for task, reference in zip(TASKS, published):
      run = chosen.get((variant, task))
      row["cells"][task] = (None if run is None else run.accuracy, reference, run is not None and run.synthetic,
                            variant in PUBLISHED)
    # Results on synthetic stand-in data stay out of the average.
    ours = [None if row["cells"][t][2] else row["cells"][t][0] for t in AVERAGED]
    row["average"] = _average(ours)
    row["average_tasks"] = sum(v is not None for v in ours)
    row["published_average"] = _average([row["cells"][t][1] for t in AVERAGED]) if variant in PUBLISHED else None
    out.append(row)
  return out


def _number(value: float | None, missing: str = "-") -> str:
  return missing if value is None else f"{value:.2f}"


def to_markdown(table: list[dict]) -> str:
  header = ["Model", *(TITLES[t] for t in TASKS), "Avg"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  notes = set()
  for row in table:
    cells = [row["title"]]
    for task in TASKS:
      ours, reference, synthetic, known = row["cells"][task]
      text = _number(ours) + ("†" if synthetic else "")
      notes |= {"synthetic"} if synthetic else set()
      if known:
        text += f" ({_number(reference, 'FAIL')})"
      cells.append(text)
    average = _number(row["average"])
    if row["average"] is not None and row["average_tasks"] < len(AVERAGED):
      average += "*"
      notes.add("partial")
    if row["published_average"] is not None:
      average += f" ({row['published_average']:.2f})"
    cells.append(average)
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Test accuracy (%); in parentheses Tay et al. 2020, Table 1 (FAIL: not above chance). "
               "Avg: mean over ListOps, Text, Retrieval, Image and Path, as in LRA.")
  if "partial" in notes:
    lines.append("* average over the tasks with a result.")
  if "synthetic" in notes:
    lines.append("† trained and tested on synthetic stand-in data (a smoke run), not comparable to the paper; left "
                 "out of the average.")
  return "\n".join(lines) + "\n"


def to_csv(table: list[dict]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(["variant", *(c for t in TASKS for c in (t, f"{t}_published", f"{t}_synthetic")),
                   "average", "average_tasks", "average_published"])
  for row in table:
    values = [row["variant"]]
    for task in TASKS:
      ours, reference, synthetic, known = row["cells"][task]
      values += [_number(ours, ""), _number(reference, "FAIL" if known else ""), int(synthetic)]
    values += [_number(row["average"], ""), row["average_tasks"], _number(row["published_average"], "")]
    writer.writerow(values)
  return buffer.getvalue()


def build(root: str | Path, split: str = "test") -> tuple[str, str]:
  """(markdown, csv) of the runs under `root`."""
  table = rows(select(find_runs(root, split)))
  return to_markdown(table), to_csv(table)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python scripts/lra_table.py <folder of workdirs> [--format ...] [--output ...]")
  root = Path(argv[1])
  if not root.is_dir():
    raise app.UsageError(f"{root} is not a folder")
  markdown, csv_text = build(root, _SPLIT.value)
  outputs = {"markdown": [(".md", markdown)], "csv": [(".csv", csv_text)],
             "both": [(".md", markdown), (".csv", csv_text)]}[_FORMAT.value]
  for suffix, text in outputs:
    if _OUTPUT.value is None:
      print(text)
    else:
      path = Path(_OUTPUT.value)
      path = path.with_suffix(suffix) if _FORMAT.value == "both" else path
      path.write_text(text)
      print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit status 2
