r"""The one experiment runner: trains every point of a sweep (one workdir each), evaluates it, writes one table.

  # Variants side by side (any config; each point trains in <workdir>/<point>):
  python scripts/sweep.py --config configs/lra/listops.py:runlocal --workdir runs/s \
      --axis model.attention.name=softmax,linear,performer
  # Several axes make a grid; dotted overrides apply to every point:
  python scripts/sweep.py --config configs/lra/text.py --workdir runs/sweep_text --config.data.data_dir=/path/to/imdb \
      --axis model.attention.name=softmax,linear --axis train.learning_rate=1e-3,2e-3
  # A config's get_sweep() (used when no --axis is given; --with_config_sweep crosses it with the axes):
  python scripts/sweep.py --config configs/lra/image.py --workdir runs/sweep_image --dry_run   # points and status
  # On Ray: a local instance by default, or a cluster (`ray start --head` first; see docs/clusters.md):
  python scripts/sweep.py --config configs/lra/listops.py:runlocal --workdir runs/s \
      --axis model.attention.name=softmax,linear,performer --launcher=ray [--ray_address=auto --ray_num_gpus=1]

Axis values are parsed as the type of the config field (`model.attention.<option>` as the variant's option type);
an unknown key or a value that does not parse stops the sweep before anything runs. A point that names another
attention variant starts from that variant's defaults. A point is finished when its `metrics.jsonl` reaches
`num_steps` and `eval_<split>.json` exists: finished points are skipped, interrupted ones resume from their latest
checkpoint. Afterwards `<workdir>/results.md` and `results.csv` hold one row per point: its overrides, status,
validation and test metrics (test: the best checkpoint), parameter count and training steps/s.

Launchers (scripts/sweep_launchers.py; this file is the runner): `local` (default; `--parallel N` runs N points at a time, each in a fresh process of the pool that
scripts/benchmark.py also uses (`lra/pool.py`; logs in `<workdir>/logs`), `--timeout=SECONDS` limits each point,
`--one_device_per_point` pins the processes of slot i to GPU i) and `ray` (`pip install -e '.[ray]'`): each point
is a Ray task in a fresh worker process calling `lra.training.train_and_evaluate`, with the resources of `--ray_resources` / `--ray_num_gpus`; one progress
bar follows every point's steps, a failed point is reported with its last error line and the others go on.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import app
from absl import flags

# Run as a script, the repository root is not on sys.path; the package layout is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lra import cli  # noqa: E402  (after the path set-up)
from lra import tables  # noqa: E402
from configs import common  # noqa: E402  pylint: disable=g-import-not-at-top
_SCRIPTS = str(Path(__file__).resolve().parent)
if _SCRIPTS not in sys.path:  # the launchers beside this file (also when loaded by path in tests)
  sys.path.insert(0, _SCRIPTS)
from sweep_launchers import PointFailed, last_error_line, launch_local, launch_ray, ray_options  # noqa: E402,F401

_CONFIG = common.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder holding one workdir per sweep point and the results table.")
_AXIS = flags.DEFINE_multi_string("axis", [], "`dotted.key=v1,v2,...`; repeat for a grid (e.g. "
                                  "--axis model.attention.name=softmax,linear --axis train.learning_rate=1e-3,2e-3).")
_WITH_CONFIG_SWEEP = flags.DEFINE_bool(
    "with_config_sweep", False, "Cross the --axis grid with the config's get_sweep() (used alone without --axis).")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "ray"], "Where points run.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "local: points run at a time (each in its own process when > 1).")
_ONE_DEVICE = flags.DEFINE_bool(
    "one_device_per_point", False, "local: pin point process i to GPU i (CUDA_VISIBLE_DEVICES) when --parallel > 1.")
_TIMEOUT = flags.DEFINE_float("timeout", None, "local: seconds a point may run, each point in its own process "
                              "(killed past it, reported as timeout; a rerun resumes it from its checkpoint).")
_SPLIT = flags.DEFINE_string("eval_split", "test", "Split evaluated on the best checkpoint after training.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Only list the points, their workdirs and status.")
_RAY_ADDRESS = flags.DEFINE_string("ray_address", None, "ray: cluster address ('auto', 'ray://host:10001', "
                                   "'host:6379'); default: start a local Ray instance.")
_RAY_RESOURCES = flags.DEFINE_string("ray_resources", None, "ray: per-point resources as JSON, e.g. '{\"GPU\": 1}' or "
                                     "'{\"TPU\": 4}' (CPU/GPU map to num_cpus/num_gpus). Default: one CPU.")
_RAY_NUM_GPUS = flags.DEFINE_float("ray_num_gpus", None, "ray: GPUs per point (shortcut for --ray_resources).")
_RAY_NUM_CPUS = flags.DEFINE_integer("ray_num_cpus", None, "ray: CPUs of the local Ray instance (default: all).")
flags.mark_flags_as_required(["config", "workdir"])

RESULTS_MD, RESULTS_CSV, POINT_FILE, RESULT_FILE = "results.md", "results.csv", "sweep_point.json", "sweep_result.json"
# Column labels of well-known keys (others use the last dotted part, or the whole key when those collide).
_LABELS = {"model.attention.name": "attention"}


# ----------------------------------------------------------------------------------------------------------------------
# Points.


def load_sweep(config_arg: str, required: bool = True) -> list[dict[str, Any]]:
  """`get_sweep(arg)` of the config file named by `--config` ("path.py" or "path.py:arg"); [] if it has none and
  `required` is False."""
  path, _, arg = config_arg.partition(":")
  module = common.load_module(path)
  if not hasattr(module, "get_sweep"):
    if required:
      raise ValueError(f"{path} defines no get_sweep(); give the points with --axis key=v1,v2")
    return []
  sweep = module.get_sweep(arg or None) if inspect.signature(module.get_sweep).parameters else module.get_sweep()
  if not sweep:
    raise ValueError(f"{path}: get_sweep() returned no points")
  return [dict(point) for point in sweep]


def _split_values(text: str) -> list[str]:
  """`a,b,(1,2)` -> ["a", "b", "(1,2)"]: commas inside brackets belong to the value."""
  values, depth, current = [], 0, ""
  for char in text:
    depth += char in "([{"
    depth -= char in ")]}"
    if char == "," and depth == 0:
      values.append(current)
      current = ""
    else:
      current += char
  values.append(current)
  return [v.strip() for v in values]


def parse_axes(texts: Sequence[str]) -> dict[str, list[str]]:
  """`["train.learning_rate=1e-3,2e-3"]` -> `{"train.learning_rate": ["1e-3", "2e-3"]}`; malformed -> ValueError."""
  axes: dict[str, list[str]] = {}
  for text in texts:
    key, eq, values = text.partition("=")
    key = key.strip()
    if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
      raise ValueError(f"--axis {text!r}: expected dotted.key=value1,value2,... (e.g. model.attention.name=softmax,"
                       f"linear)")
    split = _split_values(values)
    if not all(split):
      raise ValueError(f"--axis {text!r}: empty value; give comma-separated values")
    if key in axes:
      raise ValueError(f"--axis {key} is given twice; put all its values in one --axis")
    axes[key] = split
  return axes


def label(key: str, keys: Sequence[str]) -> str:
  if key in _LABELS:
    return _LABELS[key]
  leaves = [k.rsplit(".", 1)[-1] for k in keys if k not in _LABELS]
  leaf = key.rsplit(".", 1)[-1]
  return leaf if leaves.count(leaf) == 1 and leaf not in _LABELS.values() else key


def _fmt(value: Any) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def point_name(overrides: Mapping[str, Any]) -> str:
  """`label=value,...` for the point's overrides, safe as a folder name."""
  keys = list(overrides)
  text = ",".join(f"{label(k, keys)}={_fmt(v)}" for k, v in overrides.items())
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text) or "default"


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def build_points(config: ml_collections.ConfigDict, sweep: Sequence[Mapping[str, Any]],
                 axes: Mapping[str, Sequence[str]] | None = None
                 ) -> dict[str, tuple[dict[str, Any], ml_collections.ConfigDict]]:
  """Every point (the sweep's points crossed with the axes) -> (its typed overrides, its config), all checked before
  anything runs; a bad key or value is a ValueError naming the axis (or the get_sweep() key)."""
  axes = dict(axes or {})
  grid = common.sweep_grid(axes) if axes else [{}]
  points: dict[str, tuple[dict[str, Any], ml_collections.ConfigDict]] = {}
  for base, extra in itertools.product(list(sweep) or [{}], grid):
    overrides = {**base, **extra}
    try:
      point_config = common.apply_overrides(config, overrides)
    except ValueError as e:
      key = next((k for k in overrides if str(e).startswith(k)), "")
      source = "--axis" if key in axes else "get_sweep() key" if key else "sweep point"
      raise ValueError(f"{source} {e}") from None
    problems = _config_problems(point_config)
    if problems:
      raise ValueError(f"sweep point {overrides}: invalid config: {'; '.join(problems)}")
    # Typed values (as the config holds them), so names and tables read `0.001` for `1e-3`.
    overrides = {k: _get(point_config, k) for k in overrides}
    name = point_name(overrides)
    if name in points:
      raise ValueError(f"duplicate sweep point {name!r}: {overrides}")
    points[name] = (overrides, point_config)
  return points


def _config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The training library's config checks (ranges, choices): a bad point fails before any runs."""
  from lra.training import config_checks  # pylint: disable=g-import-not-at-top  (jax only when points are checked)
  return list(config_checks.config_problems(config))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the point's dotted keys set (see `configs.common.apply_overrides`)."""
  return common.apply_overrides(config, overrides)


def status(config: ml_collections.ConfigDict, workdir: Path, split: str) -> str:
  """"done" (trained to num_steps and evaluated), "partial" (started) or "new"."""
  workdir = Path(workdir)
  if not workdir.exists():
    return "new"
  metrics = workdir / "metrics.jsonl"
  # Fine-tuning rows only: a self-pretrained run's pretraining phase counts its own steps ("phase": "pretrain").
  steps = [r["step"] for r in map(json.loads, filter(str.strip, metrics.read_text().splitlines()))
           if r.get("phase", "finetune") == "finetune"] if metrics.exists() else []
  trained = bool(steps) and max(steps) >= config.train.num_steps
  return "done" if trained and (workdir / f"eval_{split}.json").exists() else "partial"


# ----------------------------------------------------------------------------------------------------------------------
# One point: train, evaluate, summarize (the same function on every launcher).


def parameter_count(config: ml_collections.ConfigDict) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lra.training import Experiment  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(Experiment(config).init_state)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes.params)))


def summarize(workdir: Path, split: str, parameters: int | None = None) -> dict[str, Any]:
  """Validation metrics at the evaluated checkpoint's step, `split` metrics of that checkpoint, steps/s."""
  workdir = Path(workdir)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
      if (workdir / "metrics.jsonl").exists() else []
  records = [{k: v for k, v in r.items() if k != "phase"} for r in records if r.get("phase", "finetune") == "finetune"]
  evaluated = json.loads((workdir / f"eval_{split}.json").read_text()) \
      if (workdir / f"eval_{split}.json").exists() else {}
  row: dict[str, Any] = {}
  eval_steps = [r["step"] for r in records if r["split"] not in ("train", split)]
  step = evaluated.get("step", max(eval_steps, default=None))
  for record in records:
    if record["step"] == step and record["split"] not in ("train", split):
      row.update({f"{record['split']} {k}": v for k, v in record.items() if k not in ("step", "split")})
  row.update({f"{split} {k}": v for k, v in evaluated.items()
              if k not in ("split", "checkpoint", "step") and isinstance(v, (int, float))})
  rates = [r["steps_per_second"] for r in records if r["split"] == "train" and "steps_per_second" in r]
  row["parameters"] = parameters
  # The first log interval includes compilation.
  row["steps/s"] = sorted(rates[1:] or rates)[len(rates[1:] or rates) // 2] if rates else None
  return row


def run_point(config: ml_collections.ConfigDict, overrides: dict[str, Any], workdir: str, split: str) -> dict:
  """Trains one point (resuming its workdir), evaluates its best checkpoint on `split`, writes and returns its row."""
  from lra.training import evaluate_checkpoint, train_and_evaluate  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / POINT_FILE).write_text(json.dumps(overrides, indent=2, sort_keys=True, default=str) + "\n")
  point_config = common.apply_overrides(config, overrides)
  train_and_evaluate(point_config, workdir)
  evaluate_checkpoint(point_config, workdir, split)
  row = summarize(workdir, split, parameter_count(point_config))
  (workdir / RESULT_FILE).write_text(json.dumps(row, indent=2) + "\n")
  return row


# ----------------------------------------------------------------------------------------------------------------------
# The sweep and its table.


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  return tables.markdown(rows)


def write_results(root: Path, rows: Sequence[Mapping[str, Any]]) -> str:
  """`<root>/results.md` and `results.csv`; returns the markdown table."""
  return tables.write(rows, root / RESULTS_MD, root / RESULTS_CSV).rstrip("\n")


def run_sweep(config: ml_collections.ConfigDict, sweep: Sequence[Mapping[str, Any]], root: str | Path, *,
              axes: Mapping[str, Sequence[str]] | None = None, launcher: str = "local", parallel: int = 1,
              split: str = "test", dry_run: bool = False, one_device_per_point: bool = False,
              timeout: float | None = None, ray_address: str | None = None,
              ray_resources: str | Mapping[str, float] | None = None,
              ray_num_gpus: float | None = None, ray_num_cpus: int | None = None) -> dict[str, str]:
  """Runs the unfinished points of `sweep` x `axes` under `root`, writes results.md / results.csv (unless
  `dry_run`) and returns each point's folder name -> outcome. Points are all checked before any runs. `timeout`
  (seconds, local launcher): each point runs in its own process and fails as "timeout" past it (its checkpoints
  stay: a rerun resumes it)."""
  if parallel < 1:
    raise ValueError(f"parallel={parallel} must be >= 1")
  if timeout is not None and timeout <= 0:
    raise ValueError(f"timeout={timeout} must be > 0 seconds")
  if timeout is not None and launcher != "local":
    raise ValueError(f"timeout={timeout} is for --launcher=local; Ray has its own limits (ray.cancel)")
  if launcher not in ("local", "ray"):
    raise ValueError(f"launcher={launcher!r}; valid choices: local, ray")
  options = ray_options(ray_resources, ray_num_gpus) if launcher == "ray" else {}
  root = Path(root)
  points = build_points(config, sweep, axes)
  todo, outcome = {}, {}
  for name, (overrides, point_config) in points.items():
    state = status(point_config, root / name, split)
    logging.info("sweep point %s: %s", name, state)
    if state == "done":
      outcome[name] = "done (skipped)"
    else:
      todo[name] = (overrides, root)
      outcome[name] = state
  if dry_run:
    return outcome
  root.mkdir(parents=True, exist_ok=True)
  if not todo:
    results = {}
  elif launcher == "ray":  # scripts/sweep_launchers.py
    results = launch_ray(run_point, config, todo, split, ray_address, options, ray_num_cpus)
  else:
    results = launch_local(run_point, config, todo, split, parallel, one_device_per_point, timeout)
  rows = []
  keys = list(dict.fromkeys(k for overrides, _ in points.values() for k in overrides))
  for name, (overrides, _) in points.items():
    row: dict[str, Any] = {"point": name, **{label(k, keys): _fmt(v) for k, v in overrides.items()}}
    result = results.get(name)
    if isinstance(result, BaseException):
      outcome[name] = f"failed: {last_error_line(result)}"
      row["status"] = outcome[name]
    else:
      if result is None:  # skipped: the row its run wrote
        path = root / name / RESULT_FILE
        result = json.loads(path.read_text()) if path.exists() else summarize(root / name, split)
      else:
        outcome[name] = f"{split} accuracy {result.get(f'{split} accuracy', float('nan')):.4f}" \
            if f"{split} accuracy" in result else "done"
      row["status"] = "done"
      row.update(result)
    rows.append(row)
  write_results(root, rows)
  return outcome


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    axes = parse_axes(_AXIS.value)
    config_arg = flags.FLAGS["config"].config_filename
    sweep = load_sweep(config_arg, required=not axes) if (not axes or _WITH_CONFIG_SWEEP.value) else []
    outcome = run_sweep(_CONFIG.value, sweep, _WORKDIR.value, axes=axes, launcher=_LAUNCHER.value,
                        parallel=_PARALLEL.value, split=_SPLIT.value, dry_run=_DRY_RUN.value,
                        one_device_per_point=_ONE_DEVICE.value, timeout=_TIMEOUT.value, ray_address=_RAY_ADDRESS.value,
                        ray_resources=_RAY_RESOURCES.value, ray_num_gpus=_RAY_NUM_GPUS.value,
                        ray_num_cpus=_RAY_NUM_CPUS.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  if _DRY_RUN.value:
    for name, result in outcome.items():
      print(f"{name}: {result}")
  else:
    print((Path(_WORKDIR.value) / RESULTS_MD).read_text(), end="")
  if any(result.startswith("failed") for result in outcome.values()):
    raise SystemExit(1)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit status 2
