r"""Runs the points of a config's `get_sweep()` locally, one workdir per point: train, then evaluate the test split.

  python scripts/sweep.py --config configs/lra/text.py:attention=performer --workdir runs/sweep_text \
      --config.data.data_dir=/path/to/imdb             # dotted overrides apply to every point
  python scripts/sweep.py --config configs/lra/image.py --workdir runs/sweep_image --parallel 2
  python scripts/sweep.py --config configs/lra/image.py --workdir runs/sweep_image --dry_run   # list points and status

Point k runs in `<workdir>/<key>=<value>,...` (e.g. `learning_rate=0.025,warmup_steps=4000`), which also holds
`sweep_point.json` (its overrides). A point is finished when its `metrics.jsonl` has the last training step and its
`eval_<split>.json` exists: finished points are skipped, interrupted ones resume from their latest checkpoint (that is
what train.py does on an existing workdir). `--parallel N` runs N points at a time in separate processes; on a box
with several accelerators add `--one_device_per_point` so that point processes do not share a GPU. Afterwards,
`python scripts/lra_table.py <workdir>` builds the table from the finished points.
"""

from __future__ import annotations

import concurrent.futures
import copy
import importlib.util
import inspect
import json
import logging
import multiprocessing
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with get_sweep(), optionally with ':arg'.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder holding one workdir per sweep point.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points run at a time (each in its own process when > 1).")
_SPLIT = flags.DEFINE_string("eval_split", "test", "Split evaluated after training (eval_<split>.json).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Only list the points, their workdirs and status.")
_ONE_DEVICE = flags.DEFINE_bool("one_device_per_point", False,
                                "Pin point process i to accelerator i (CUDA_VISIBLE_DEVICES) when --parallel > 1.")
flags.mark_flags_as_required(["config", "workdir"])


def load_sweep(config_arg: str) -> list[dict[str, Any]]:
  """`get_sweep(arg)` of the config file named by `--config` ("path.py" or "path.py:arg")."""
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(); nothing to sweep")
  sweep = module.get_sweep(arg or None) if inspect.signature(module.get_sweep).parameters else module.get_sweep()
  if not sweep:
    raise ValueError(f"{path}: get_sweep() returned no points")
  return [dict(point) for point in sweep]


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set; an unknown key is a ValueError naming it."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ValueError(f"sweep key {key!r}: the config has no {part!r}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"sweep key {key!r}: the config has no {leaf!r}; valid: {sorted(node.keys())}")
    node[leaf] = value
  return config


def point_name(overrides: dict[str, Any]) -> str:
  """`leaf=value,...` for the point's overrides, safe as a folder name."""
  leaves = [key.rsplit(".", 1)[-1] for key in overrides]
  keys = leaves if len(set(leaves)) == len(leaves) else list(overrides)
  text = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in zip(keys, overrides.values()))
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def status(config: ml_collections.ConfigDict, workdir: Path, split: str) -> str:
  """"done" (trained to num_steps and evaluated), "partial" (started) or "new"."""
  if not workdir.exists():
    return "new"
  metrics = workdir / "metrics.jsonl"
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()] \
      if metrics.exists() else []
  trained = bool(steps) and max(steps) >= config.train.num_steps
  return "done" if trained and (workdir / f"eval_{split}.json").exists() else "partial"


def run_point(config: ml_collections.ConfigDict, overrides: dict[str, Any], workdir: str, split: str) -> dict:
  """Trains one point (resuming its workdir) and evaluates its best checkpoint on `split`; returns that result."""
  from lra.training import evaluate_checkpoint, train_and_evaluate  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "sweep_point.json").write_text(json.dumps(overrides, indent=2, sort_keys=True) + "\n")
  point_config = apply_overrides(config, overrides)
  train_and_evaluate(point_config, workdir)
  return evaluate_checkpoint(point_config, workdir, split)


def _run_on_device(devices, *args) -> dict:
  """`run_point` with CUDA_VISIBLE_DEVICES set to a device taken from the `devices` queue (given back after)."""
  device = devices.get()
  os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
  try:
    return run_point(*args)
  finally:
    devices.put(device)


def run_sweep(config: ml_collections.ConfigDict, sweep: Sequence[dict[str, Any]], root: str | Path, *,
              parallel: int = 1, split: str = "test", dry_run: bool = False,
              one_device_per_point: bool = False) -> dict[str, str]:
  """Runs the unfinished points of `sweep` under `root`; returns each point's folder name -> outcome."""
  if parallel < 1:
    raise ValueError(f"parallel={parallel} must be >= 1")
  root = Path(root)
  points = {point_name(overrides): overrides for overrides in sweep}
  if len(points) < len(sweep):
    raise ValueError(f"get_sweep() has duplicate points: {list(sweep)}")
  todo, outcome = {}, {}
  for name, overrides in points.items():
    state = status(apply_overrides(config, overrides), root / name, split)
    logging.info("sweep point %s: %s", name, state)
    if state == "done":
      outcome[name] = "done (skipped)"
    else:
      todo[name] = overrides
      outcome[name] = state
  if dry_run:
    return outcome
  if parallel == 1:
    for name, overrides in todo.items():
      try:
        result = run_point(config, overrides, str(root / name), split)
        outcome[name] = f"{split} accuracy {result['accuracy']:.4f}"
      except Exception as e:  # pylint: disable=broad-except  (the other points still run)
        outcome[name] = f"failed: {type(e).__name__}: {e}"
        logging.exception("sweep point %s failed", name)
    return outcome
  # spawn: point processes start clean (no forked JAX state); each process runs one point.
  context = multiprocessing.get_context("spawn")
  with context.Manager() as manager, concurrent.futures.ProcessPoolExecutor(
      parallel, mp_context=context, max_tasks_per_child=1) as pool:
    if one_device_per_point:
      devices = manager.Queue()
      for i in range(parallel):
        devices.put(i)
      submit = lambda *args: pool.submit(_run_on_device, devices, *args)  # noqa: E731
    else:
      submit = lambda *args: pool.submit(run_point, *args)  # noqa: E731
    futures = {submit(config, overrides, str(root / name), split): name for name, overrides in todo.items()}
    for future in concurrent.futures.as_completed(futures):
      name = futures[future]
      try:
        outcome[name] = f"{split} accuracy {future.result()['accuracy']:.4f}"
      except Exception as e:  # pylint: disable=broad-except
        outcome[name] = f"failed: {type(e).__name__}: {e}"
        logging.error("sweep point %s failed: %s", name, e)
  return outcome


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  sweep = load_sweep(config_flags.get_config_filename(flags.FLAGS["config"]))
  outcome = run_sweep(_CONFIG.value, sweep, _WORKDIR.value, parallel=_PARALLEL.value, split=_SPLIT.value,
                      dry_run=_DRY_RUN.value, one_device_per_point=_ONE_DEVICE.value)
  for name, result in outcome.items():
    print(f"{name}: {result}")
  if any(result.startswith("failed") for result in outcome.values()):
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
