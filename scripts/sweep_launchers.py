"""The launchers of scripts/sweep.py (the runner): where a sweep's points run. Each launcher takes the runner's
`run_point(config, overrides, workdir, split) -> row` and returns `{point name: its row, or the exception it
failed with}`:

- `launch_local`: in this process one point after another, or each point in a fresh process of lra/pool.py
  (`--parallel N`, `--timeout`, `--one_device_per_point`);
- `launch_ray`: each point a Ray task (`--launcher=ray`, `--ray_address`, `--ray_resources`, `--ray_num_gpus`).

The dependency runs one way: sweep.py imports this module, never the reverse (the runner is passed in).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import ml_collections

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from configs import common  # noqa: E402  (after the path set-up)
from lra import pool  # noqa: E402

RunPoint = Callable[[ml_collections.ConfigDict, dict, str, str], dict]


def last_error_line(error: BaseException) -> str:
  """The one line a failed point is reported by (a Ray task error: its point's own exception)."""
  if isinstance(error, PointFailed):
    return str(error)
  cause = getattr(error, "cause", None) or error  # a RayTaskError carries the point's own exception
  text = f"{type(cause).__name__}: {cause}".strip()
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else type(cause).__name__


class PointFailed(Exception):
  """A point that failed in its own process: the message is its error line (or its timeout)."""


def launch_local(run_point: RunPoint, config: ml_collections.ConfigDict, todo: Mapping[str, tuple], split: str,
                 parallel: int, one_device_per_point: bool, timeout: float | None = None) -> dict:
  """`--launcher=local`: the points in this process one after another, or (`parallel > 1` or a `timeout`) each in a
  fresh process of lra.pool."""
  results: dict[str, Any] = {}
  if parallel == 1 and timeout is None:
    for name, (overrides, root) in todo.items():
      try:
        results[name] = run_point(config, overrides, str(root / name), split)
      except Exception as e:  # pylint: disable=broad-except  (the other points still run)
        logging.exception("sweep point %s failed", name)
        results[name] = e
    return results
  # Each point in a fresh process of lra.pool (no JAX state shared between points), with its log under
  # <root>/logs and, with `timeout`, a time limit.
  sweep_root = next(iter(todo.values()))[1]
  jobs = [pool.python_job(name, run_point, [(config, overrides, str(root / name), split)],
                          work_dir=sweep_root / "logs" / "calls")
          for name, (overrides, root) in todo.items()]
  slot_env = (lambda i: {"CUDA_VISIBLE_DEVICES": str(i)}) if one_device_per_point else None

  def on_outcome(outcome: pool.Outcome) -> None:
    if outcome.status == "ok":
      results[outcome.job] = {k: v for k, v in outcome.record.items() if k != "status"}
      logging.info("sweep point %s: done", outcome.job)
    else:
      message = outcome.error if outcome.status == "error" else f"{outcome.status}: {outcome.error}"
      results[outcome.job] = PointFailed(message)
      logging.error("sweep point %s failed: %s (log: %s)", outcome.job, message, outcome.log)

  pool.run(jobs, log_dir=sweep_root / "logs", timeout=timeout, parallel=parallel, slot_env=slot_env,
           on_outcome=on_outcome)
  return results


def ray_options(resources: str | Mapping[str, float] | None, num_gpus: float | None) -> dict[str, Any]:
  """Ray task options from `--ray_resources` (JSON) and `--ray_num_gpus`; bad JSON -> ValueError."""
  if isinstance(resources, str):
    try:
      resources = json.loads(resources)
    except json.JSONDecodeError as e:
      raise ValueError(f"--ray_resources={resources!r} is not JSON ({e}); e.g. '{{\"GPU\": 1}}'") from None
  resources = dict(resources or {})
  if not all(isinstance(v, (int, float)) and v >= 0 for v in resources.values()):
    raise ValueError(f"--ray_resources={resources!r}: values must be non-negative numbers")
  options: dict[str, Any] = {"num_cpus": resources.pop("CPU", 1)}
  if "GPU" in resources or num_gpus:
    options["num_gpus"] = num_gpus if num_gpus is not None else resources.pop("GPU")
  resources.pop("GPU", None)
  if resources:
    options["resources"] = resources
  return options


def _ray_point(run_point, config, overrides, workdir, split, name, queue) -> dict:
  """A Ray task: `run_point`, reporting its training step to `queue` from a thread that follows metrics.jsonl."""
  done = threading.Event()
  metrics = Path(workdir) / "metrics.jsonl"

  def report():
    last = None
    while not done.wait(1.0):
      try:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        step = max((json.loads(line)["step"] for line in lines if line.strip()), default=0)
      except (OSError, ValueError):
        continue
      if step != last:
        queue.put_nowait((name, step))
        last = step

  queue.put_nowait((name, "started"))
  thread = threading.Thread(target=report, daemon=True)
  thread.start()
  try:
    return run_point(config, overrides, workdir, split)
  finally:
    done.set()
    thread.join()


def launch_ray(run_point: RunPoint, config: ml_collections.ConfigDict, todo: Mapping[str, tuple], split: str,
               address: str | None, options: Mapping[str, Any], num_cpus: int | None = None) -> dict:
  """`--launcher=ray`: each point a Ray task in a fresh worker process (`options`: `ray_options`), one progress bar
  over every point's steps; a failed point is its exception in the result."""
  try:
    import ray  # pylint: disable=g-import-not-at-top
    from ray.util.queue import Queue  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("--launcher=ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  # Ship the scripts' functions by value (this module, and the runner's when it is imported rather than __main__, which
  # cloudpickle ships by value anyway); workers import only the installed packages (configs, lra), which every node
  # must have.
  ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
  if run_point.__module__ != "__main__":
    ray.cloudpickle.register_pickle_by_value(sys.modules[run_point.__module__])
  started_here = not ray.is_initialized()
  if started_here:
    # Plugin modules (ATTENTION_PLUGINS, TASK_PLUGINS) are named to every worker, on a cluster too (each node must be
    # able to import them); `attention` and `lra.tasks` import them in the worker.
    plugins = {k: os.environ[k] for k in ("ATTENTION_PLUGINS", "TASK_PLUGINS") if os.environ.get(k)}
    if address:
      ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": plugins} if plugins else None)
    else:
      # A local instance; its workers see this process's environment (JAX_PLATFORMS, XLA_FLAGS, ...).
      env = {**{k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_", "CUDA_", "TPU_"))}, **plugins}
      ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
               runtime_env={"env_vars": env} if env else None)
  results: dict[str, Any] = {}
  try:
    queue = Queue(actor_options={"num_cpus": 0})
    # max_calls=1: every point gets a fresh worker process, so JAX sees the devices Ray assigned to this task and
    # frees their memory when the point ends.
    task = ray.remote(max_calls=1)(_ray_point).options(**options)
    refs = {task.remote(run_point, config, overrides, str(root / name), split, name, queue): name
            for name, (overrides, root) in todo.items()}
    num_steps = {name: common.apply_overrides(config, overrides).train.num_steps
                 for name, (overrides, _) in todo.items()}
    steps = dict.fromkeys(todo, 0)
    running: set[str] = set()
    # One bar over every point's steps on a terminal; elsewhere (logs, CI) only the per-point lines.
    bar = tqdm(total=sum(num_steps.values()), desc="sweep", unit="step", dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    pending = list(refs)
    shown = [None]

    def drain():
      while not queue.empty():
        name, event = queue.get_nowait()
        if event == "started":
          running.add(name)
        else:
          steps[name] = min(int(event), num_steps[name])
      failed = sum(isinstance(r, Exception) for r in results.values())
      state = (sum(steps.values()), f"running: {','.join(sorted(running)) or '-'} | done {len(results) - failed} "
                                    f"| failed {failed}")
      if state != shown[0]:
        bar.n, shown[0] = state[0], state
        bar.set_postfix_str(state[1], refresh=True)

    while pending:
      ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
      for ref in ready:
        name = refs[ref]
        running.discard(name)
        try:
          results[name] = ray.get(ref)
          steps[name] = num_steps[name]
          bar.write(f"{name}: done ({len(results)}/{len(refs)})")
        except Exception as e:  # pylint: disable=broad-except  (report, keep the others running)
          results[name] = e
          bar.write(f"{name}: FAILED: {last_error_line(e)} ({len(results)}/{len(refs)})")
      drain()
    bar.close()
  finally:
    if started_here:
      ray.shutdown()
  return results
