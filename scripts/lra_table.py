r"""Builds the LRA accuracy table from a folder of run workdirs (tasks as columns, attention variants as rows) and, with
`--run`, first trains a named protocol's points there, resumably, within a time budget.

Each workdir (found at any depth) holds the `config.json` written by train.py and the `eval_test.json` written by
`python eval.py --workdir <workdir> --split test` (scripts/sweep.py writes both). Every cell shows our test accuracy
(%) with the published number of Tay et al. 2020 (Table 1) in parentheses; the average leaves out Path-X, as LRA's,
and results on synthetic stand-in data (marked †).
Where several runs share a task and variant (a sweep), the one with the best validation accuracy in its
`metrics.jsonl` is taken (never the best on test).

  python scripts/lra_table.py runs/                         # markdown and CSV to stdout
  python scripts/lra_table.py runs/ --format=csv --output=lra_table.csv
  python scripts/lra_table.py runs/small --protocol=small    # published column: the small-model re-runs

Running a protocol (`--run`): the points are tasks x `--variants` x `--pretrain` objectives, each the config
`configs/lra/<task>.py:protocol=<protocol>,pretrain=<objective>,attention=<variant>` trained and evaluated by
scripts/sweep.py's runner (`run_point`) in `<folder>/<task>/<variant>[+<objective>]`. Finished points are skipped, the
others resume from their latest checkpoint. With `--time_budget=SECONDS` the call stops when the budget is spent:
the running point gets SIGTERM, which the training loop turns into a checkpoint at the next step boundary
(lra/training/preemption.py), and no new point starts; the next call goes on from there. The table
(`<folder>/lra_table.md` and `.csv`, with each point's status) is rebuilt after every call, so a short accelerator
loan, or a CPU overnight, makes progress and leaves a partial table that says which points it holds:

  python scripts/lra_table.py runs/lra_small --run --protocol=small --time_budget=3600 \
      --variants=softmax,linear,performer --pretrain=none,masked --data_dir=text=../shared/data/imdb
  # CPU-sized points: each task's runlocal settings under the protocol's model, overrides for every point:
  python scripts/lra_table.py runs/lra_small_local --run --protocol=small --runlocal --tasks=listops,text \
      --time_budget=600 --data_dir=text=../shared/data/imdb --set=train.num_steps=200
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import app
from absl import flags

# Run as a script, the repository root is not on sys.path; the package layout is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lra import cli  # noqa: E402  (after the path set-up)
from lra import tables  # noqa: E402

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

# The small-model re-run protocol (configs/common.py): Xiong et al. 2021 (Nystromformer), their re-run of the
# Transformer; no Path-X. Self-pretraining rows have no published figures at either protocol's model size.
SMALL_PUBLISHED: dict[str, tuple[str, tuple[float | None, ...]]] = {
    "softmax": ("Transformer", (37.10, 65.02, 79.35, 38.20, 74.16, None)),
}
PUBLISHED_BY_PROTOCOL = {"paper": PUBLISHED, "small": SMALL_PUBLISHED}
SOURCES = {"paper": "Tay et al. 2020, Table 1 (FAIL: not above chance)",
           "small": "the small-model re-runs, Xiong et al. 2021 (Nystromformer), Transformer 2 layers / 64 dims"}

_FORMAT = flags.DEFINE_enum("format", "both", ["markdown", "csv", "both"], "Output format.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "Write here instead of stdout (with --format=both: <output>.md and <output>.csv).")
_SPLIT = flags.DEFINE_string("split", "test", "Reads eval_<split>.json.")
_PROTOCOL = flags.DEFINE_enum("protocol", "paper", ["paper", "small"],
                              "The protocol: its configs (with --run) and the published numbers shown beside ours.")
_RUN = flags.DEFINE_bool("run", False, "Train the protocol's points under the folder first (resumable), then rebuild.")
_TIME_BUDGET = flags.DEFINE_float("time_budget", None, "--run: seconds this call may train; the running point stops "
                                  "at a checkpoint when they are spent and the next call resumes it.")
_TASKS = flags.DEFINE_list("tasks", list(AVERAGED), "--run: tasks.")
_VARIANTS = flags.DEFINE_list("variants", ["softmax"], "--run: attention variants.")
_PRETRAIN = flags.DEFINE_list("pretrain", ["none"], "--run: self-pretraining objectives (none, masked, causal).")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "--run: each task's runlocal (CPU-sized) settings.")
_SET = flags.DEFINE_multi_string("set", [], "--run: dotted override for every point, key=value.")
_DATA_DIR = flags.DEFINE_multi_string("data_dir", [], "--run: task=path: config.data.data_dir of one task.")
cli.check_flag(_TIME_BUDGET, lambda seconds: seconds > 0, "a positive number of seconds (omit it for no limit)")


@dataclasses.dataclass
class Run:
  workdir: Path
  task: str
  variant: str
  accuracy: float  # percent
  validation: float | None  # best validation accuracy in metrics.jsonl (percent), for choosing among runs
  synthetic: bool  # trained on synthetic stand-in data (Retrieval runlocal)
  pretrain: str = ""  # the self-pretraining objective ("" = trained from scratch)

  @property
  def row_key(self) -> str:
    """The table row: the variant, `+<objective>` for a self-pretrained run."""
    return f"{self.variant}+{self.pretrain}" if self.pretrain else self.variant


def _best_validation(workdir: Path) -> float | None:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return None
  # Fine-tuning rows only: a self-pretrained run also logs its pretraining phase ("phase": "pretrain").
  values = [r["accuracy"] for r in map(json.loads, path.read_text().splitlines())
            if r.get("split") == "validation" and "accuracy" in r and r.get("phase", "finetune") == "finetune"]
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
    pretrain = config.get("pretrain") or {}
    objective = pretrain.get("objective", "") if (pretrain.get("steps") or 0) > 0 else ""
    runs.append(Run(workdir, config["task"], config["model"]["attention"]["name"], 100 * accuracy,
                    _best_validation(workdir), bool(config.get("data", {}).get("synthetic")), objective))
  return runs


def select(runs: Sequence[Run]) -> dict[tuple[str, str], Run]:
  """One run per (row, task): the best by validation accuracy (runs without one come last). The row is the variant,
  or `<variant>+<objective>` for self-pretrained runs."""
  chosen: dict[tuple[str, str], Run] = {}
  for run in runs:
    key = (run.row_key, run.task)
    best = chosen.get(key)
    rank = lambda r: -math.inf if r.validation is None else r.validation  # noqa: E731
    if best is None or rank(run) > rank(best):
      chosen[key] = run
  return chosen


def _average(values: Sequence[float | None]) -> float | None:
  present = [v for v in values if v is not None]
  return sum(present) / len(present) if present else None


def rows(chosen: dict[tuple[str, str], Run], protocol: str = "paper") -> list[dict]:
  """One dict per row (variant, or variant + pretraining objective): ours and the protocol's published accuracy per
  task, and their averages over AVERAGED."""
  published_table = PUBLISHED_BY_PROTOCOL[protocol]
  variants = sorted({variant for variant, _ in chosen}, key=lambda v: (v not in published_table, v))
  out = []
  for variant in variants:
    base, _, objective = variant.partition("+")
    title, published = published_table.get(variant, (None, (None,) * len(TASKS)))
    if title is None:  # not published: named after the variant's published title, if any
      title = PUBLISHED.get(base, (base,))[0] + (f" + {objective} SPT" if objective else "")
    row = {"variant": variant, "title": title, "cells": {}}
    for task, reference in zip(TASKS, published):
      run = chosen.get((variant, task))
      row["cells"][task] = (None if run is None else run.accuracy, reference, run is not None and run.synthetic,
                            variant in published_table and (reference is not None or protocol == "paper"))
    # Results on synthetic stand-in data stay out of the average.
    ours = [None if row["cells"][t][2] else row["cells"][t][0] for t in AVERAGED]
    row["average"] = _average(ours)
    row["average_tasks"] = sum(v is not None for v in ours)
    row["published_average"] = _average([row["cells"][t][1] for t in AVERAGED]) if variant in published_table \
        else None
    out.append(row)
  return out


def _number(value: float | None, missing: str = "-") -> str:
  return missing if value is None else f"{value:.2f}"


def to_markdown(table: list[dict], protocol: str = "paper") -> str:
  header = ["Model", *(TITLES[t] for t in TASKS), "Avg"]
  notes = set()
  cell_rows = []
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
    cell_rows.append(dict(zip(header, cells)))
  lines = [tables.markdown(cell_rows, header), ""]
  lines.append(f"Test accuracy (%); in parentheses {SOURCES[protocol]}. "
               "Avg: mean over ListOps, Text, Retrieval, Image and Path, as in LRA. "
               "`+masked` / `+causal`: self-pretrained on the task's own inputs (Amos et al. 2024) before fine-tuning.")
  if "partial" in notes:
    lines.append("* average over the tasks with a result.")
  if "synthetic" in notes:
    lines.append("† trained and tested on synthetic stand-in data (a smoke run), not comparable to the paper; left "
                 "out of the average.")
  return "\n".join(lines) + "\n"


def to_csv(table: list[dict]) -> str:
  columns = ["variant", *(c for t in TASKS for c in (t, f"{t}_published", f"{t}_synthetic")),
             "average", "average_tasks", "average_published"]
  csv_rows = []
  for row in table:
    values = [row["variant"]]
    for task in TASKS:
      ours, reference, synthetic, known = row["cells"][task]
      values += [_number(ours, ""), _number(reference, "FAIL" if known else ""), int(synthetic)]
    values += [_number(row["average"], ""), row["average_tasks"], _number(row["published_average"], "")]
    csv_rows.append(dict(zip(columns, values)))
  return tables.csv_text(csv_rows, columns)


def build(root: str | Path, split: str = "test", protocol: str = "paper") -> tuple[str, str]:
  """(markdown, csv) of the runs under `root`, beside `protocol`'s published numbers."""
  table = rows(select(find_runs(root, split)), protocol)
  return to_markdown(table, protocol), to_csv(table)


# ----------------------------------------------------------------------------------------------------------------------
# --run: a protocol's points, resumable, within a time budget.

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "lra"
TABLE_MD, TABLE_CSV = "lra_table.md", "lra_table.csv"


@dataclasses.dataclass(frozen=True)
class Point:
  task: str
  variant: str
  pretrain: str  # "none", "masked" or "causal"
  runlocal: bool = False

  @property
  def name(self) -> str:
    return f"{self.task}/{self.variant}" + ("" if self.pretrain == "none" else f"+{self.pretrain}")

  @property
  def spec(self) -> str:
    """The `--config` of this point."""
    arg = f"protocol={{protocol}},pretrain={self.pretrain},attention={self.variant}" + (",runlocal" if self.runlocal
                                                                                       else "")
    return f"{CONFIG_DIR / self.task}.py:{arg}"


def protocol_points(tasks: Sequence[str], variants: Sequence[str], pretrain: Sequence[str],
                    runlocal: bool = False) -> list[Point]:
  """Tasks x variants x pretraining objectives, task-major (a budgeted call finishes a task's row first)."""
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; valid choices: {', '.join(TASKS)}")
  return [Point(t, v, p, runlocal) for t in tasks for v in variants for p in pretrain]


def _key_values(texts: Sequence[str], flag: str) -> dict[str, str]:
  out = {}
  for text in texts:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
      raise ValueError(f"--{flag}={text!r}: expected key=value")
    out[key.strip()] = value.strip()
  return out


class _Deadline:
  """SIGTERM to this process once `seconds` have passed, repeated every second until `cancel()`: the training loop's
  preemption guard turns the first one it sees into a checkpoint and `Preempted`; while no guard is installed
  (loading data, compiling, evaluating) this object's own handler only notes it, so nothing dies mid-write."""

  def __init__(self, seconds: float | None):
    self.seconds = seconds
    self.expired = False
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._previous = None

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self.expired = True

  def _run(self) -> None:
    if self._stop.wait(max(self.seconds, 0.0)):
      return
    self.expired = True
    while not self._stop.is_set():
      os.kill(os.getpid(), signal.SIGTERM)
      self._stop.wait(1.0)

  def __enter__(self) -> "_Deadline":
    if self.seconds is not None:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
      self._thread = threading.Thread(target=self._run, daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      signal.signal(signal.SIGTERM, self._previous)


def _sweep_module():
  """scripts/sweep.py (the one runner), imported for its functions without its command-line flags (it marks
  --config and --workdir required, which this script's command line does not have)."""
  if "sweep" in sys.modules:
    return sys.modules["sweep"]
  before = set(flags.FLAGS)
  import sweep  # pylint: disable=g-import-not-at-top
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
  return sweep


def run_protocol(root: str | Path, protocol: str, points: Sequence[Point], *, time_budget: float | None = None,
                 overrides: Mapping[str, str] | None = None, data_dirs: Mapping[str, str] | None = None,
                 split: str = "test") -> dict[str, str]:
  """Trains the unfinished `points` under `root` (sweep.py's `run_point` each) until `time_budget` seconds are spent,
  then rebuilds `<root>/lra_table.md` / `.csv`. Returns each point's status: "done", "stopped at step N" (a
  checkpoint the next call resumes), "partial" / "new" (not reached in this call) or "failed: ...". """
  sweep = _sweep_module()
  from configs import common  # pylint: disable=g-import-not-at-top
  from lra.training import preemption  # pylint: disable=g-import-not-at-top

  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  unknown = sorted(set(data_dirs or {}) - {p.task for p in points})
  if unknown:
    raise ValueError(f"--data_dir for task(s) {unknown} that no point trains; tasks: "
                     f"{', '.join(sorted({p.task for p in points}))}")
  # Every point's config is built (and validated) before anything trains.
  prepared = []
  for point in points:
    config = common.load_config_file(point.spec.format(protocol=protocol))
    point_overrides: dict[str, Any] = dict(overrides or {})
    if point.task in (data_dirs or {}):
      point_overrides["data.data_dir"] = data_dirs[point.task]
    point_config = common.apply_overrides(config, point_overrides)
    problems = sweep._config_problems(point_config)  # pylint: disable=protected-access
    if problems:
      raise ValueError(f"point {point.name}: invalid config: {'; '.join(problems)}")
    prepared.append((point, config, point_overrides, point_config))

  statuses: dict[str, str] = {}
  start = time.monotonic()
  with _Deadline(time_budget) as deadline:
    for point, config, point_overrides, point_config in prepared:
      workdir = root / point.name
      state = sweep.status(point_config, workdir, split)
      if state == "done":
        statuses[point.name] = "done"
        continue
      if deadline.expired or (time_budget is not None and time.monotonic() - start >= time_budget):
        statuses[point.name] = state  # not reached in this call
        continue
      logging.info("lra_table point %s (%s): training", point.name, state)
      try:
        sweep.run_point(config, point_overrides, str(workdir), split)
        statuses[point.name] = "done"
      except preemption.Preempted as e:
        phase = "pretraining " if e.workdir is not None and Path(e.workdir).name == "pretrain" else ""
        statuses[point.name] = f"stopped at {phase}step {e.step}"
      except Exception as e:  # pylint: disable=broad-except  (the other points still run)
        logging.exception("point %s failed", point.name)
        statuses[point.name] = f"failed: {sweep.last_error_line(e)}"
  write_table(root, protocol, statuses, split)
  return statuses


def write_table(root: Path, protocol: str, statuses: Mapping[str, str], split: str = "test") -> str:
  """`<root>/lra_table.md` (the table, then every point's status) and `lra_table.csv`; returns the markdown."""
  markdown, csv_text = build(root, split, protocol)
  lines = [markdown, f"Points (protocol {protocol}; rebuilt {time.strftime('%Y-%m-%d %H:%M:%S')}):", ""]
  lines += [f"- `{name}`: {state}" for name, state in statuses.items()]
  text = "\n".join(lines) + "\n"
  (root / TABLE_MD).write_text(text)
  (root / TABLE_CSV).write_text(csv_text)
  return text


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python scripts/lra_table.py <folder of workdirs> [--format ...] [--output ...] "
                         "[--run --protocol=... --time_budget=...]")
  root = Path(argv[1])
  if _RUN.value:
    logging.getLogger().setLevel(logging.INFO)
    points = protocol_points(_TASKS.value, _VARIANTS.value, _PRETRAIN.value, _RUNLOCAL.value)
    statuses = run_protocol(root, _PROTOCOL.value, points, time_budget=_TIME_BUDGET.value,
                            overrides=_key_values(_SET.value, "set"),
                            data_dirs=_key_values(_DATA_DIR.value, "data_dir"), split=_SPLIT.value)
    print((root / TABLE_MD).read_text(), end="")
    if any(state.startswith("failed") for state in statuses.values()):
      raise SystemExit(1)
    return
  if not root.is_dir():
    raise app.UsageError(f"{root} is not a folder")
  markdown, csv_text = build(root, _SPLIT.value, _PROTOCOL.value)
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
