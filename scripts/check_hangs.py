r"""Hang check: each attention variant's compiled ListOps training step, run in many fresh processes under a time limit.

  python scripts/check_hangs.py                                    # every variant, 10 runs each
  python scripts/check_hangs.py --attention=performer --runs=20 --timeout=300
  python scripts/check_hangs.py --attention=performer --performer_features=lapack_qr   # the old, deadlocking draw

Why fresh processes: a deadlock between XLA:CPU's intra-op threads (a custom call such as jaxlib's batched LAPACK QR
handing work to the thread pool it occupies) depends on thread timing, so it shows up in some processes and not
others, and a hung process cannot be reused. Each run builds configs/lra/listops.py:runlocal with the variant
(`--num_layers`, `--length`, `--batch_size` override it; no data is read: batches are random tokens), compiles the
training step, runs `--steps` steps and exits; a run that does not finish within `--timeout` seconds is a hang, a
non-zero exit a crash. `--cpus=N` pins each run to N cores before jax starts (the intra-op pool has one thread per
core available), so a many-core machine reproduces the pool size of a small one.

The table also lists the custom-call targets in each variant's compiled step (custom calls are where XLA:CPU leaves
its own scheduling). Exit status: 0 if no run hung or crashed, 1 otherwise, 2 for bad flags.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from absl import flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from lra import cli  # noqa: E402  (after the path set-up)

RESULT_PREFIX = "CHECK_HANGS_RESULT "
FEATURES = ("gram_schmidt", "lapack_qr")

_ATTENTION = flags.DEFINE_list("attention", [], "Variants to check (default: every registered one).")
_RUNS = flags.DEFINE_integer("runs", 10, "Fresh processes per variant.", lower_bound=1)
_TIMEOUT = flags.DEFINE_float("timeout", 240.0, "Seconds one run may take before it is a hang (> 0).")
flags.register_validator("timeout", lambda value: value > 0, message="--timeout must be > 0 seconds")
_JOBS = flags.DEFINE_integer("jobs", 2, "Runs at a time (contention makes races likelier).", lower_bound=1)
_LENGTH = flags.DEFINE_integer("length", 256, "Tokens per sequence.", lower_bound=1)
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Encoder layers.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch size.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 3, "Training steps per run after compiling.", lower_bound=1)
_CPUS = flags.DEFINE_integer("cpus", 0, "Pin each run to this many cores (0: all available).", lower_bound=0)
_PERFORMER_FEATURES = flags.DEFINE_enum(
    "performer_features", "gram_schmidt", FEATURES,
    "lapack_qr reinstates the old batched-QR draw, to show the deadlock this check guards.")
_WORKER = flags.DEFINE_bool("worker", False, "Internal: be one run (what the check starts in each fresh process).")


@dataclasses.dataclass(frozen=True)
class Run:
  """What one run builds and steps."""

  length: int = 256
  num_layers: int = 2
  batch_size: int = 8
  steps: int = 3
  cpus: int = 0
  performer_features: str = "gram_schmidt"

  def command_line(self) -> list[str]:
    return [f"--{field.name}={getattr(self, field.name)}" for field in dataclasses.fields(self)]


def _use_lapack_qr() -> None:
  """Reinstates the old batched `jnp.linalg.qr` draw of Performer's features (to reproduce the deadlock)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from attention import random_features  # pylint: disable=g-import-not-at-top

  def lapack_rows(x):
    q, _ = jnp.linalg.qr(jnp.swapaxes(x, -1, -2))  # columns orthonormal
    return jnp.swapaxes(q, -1, -2)

  random_features.orthonormalize_rows = lapack_rows


def custom_call_targets(hlo_text: str) -> list[str]:
  """Sorted distinct custom-call targets named in HLO text (compiled) or StableHLO (lowered)."""
  names = re.findall(r'custom_call_target="([^"]+)"', hlo_text)
  names += re.findall(r"stablehlo\.custom_call @([\w.$-]+)", hlo_text)
  return sorted(set(names))


def worker(name: str, run: Run) -> None:
  """One run in this process: build, compile, step; prints one JSON result line."""
  if run.cpus:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:run.cpus])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs.lra import listops  # pylint: disable=g-import-not-at-top
  from lra.training import trainer  # pylint: disable=g-import-not-at-top

  if run.performer_features == "lapack_qr":
    _use_lapack_qr()
  config = listops.get_config(f"runlocal,attention={name}")
  config.data.max_length = run.length
  config.model.num_layers = run.num_layers
  config.train.batch_size = run.batch_size
  experiment = trainer.Experiment(config)
  state = experiment.init_state()
  rng = np.random.default_rng(0)
  batch = experiment.task.dummy_batch(run.batch_size)
  batch["inputs"] = rng.integers(1, 16, batch["inputs"].shape).astype(batch["inputs"].dtype)
  batch["targets"] = rng.integers(0, 10, batch["targets"].shape).astype(batch["targets"].dtype)
  batch = {k: jax.device_put(v, experiment.batch_sharding) for k, v in batch.items()}
  step = experiment.jit_train_step
  compiled = step.lower(state, batch, experiment.key).compile()
  calls = custom_call_targets(compiled.as_text())
  loss = None
  for _ in range(run.steps):
    state, metrics = step(state, batch, experiment.key)
    loss = float(metrics["loss"])
  print(RESULT_PREFIX + json.dumps({"custom_calls": calls, "loss": loss}), flush=True)


def run_once(name: str, run: Run, timeout: float) -> dict:
  """One fresh process; {"status": "ok"|"hang"|"crash", "seconds", "custom_calls", "detail"}."""
  command = [sys.executable, str(Path(__file__).resolve()), "--worker", f"--attention={name}", *run.command_line()]
  start = time.monotonic()
  # A new session so a hung run is killed with every thread and child it has.
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return {"status": "hang", "seconds": time.monotonic() - start, "custom_calls": None,
            "detail": f"no exit within {timeout}s"}
  seconds = time.monotonic() - start
  lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
  if proc.returncode != 0 or not lines:
    lines = err.strip().splitlines() or ["(no output)"]
    tail = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), lines[-1])
    return {"status": "crash", "seconds": seconds, "custom_calls": None,
            "detail": f"exit status {proc.returncode}: {tail}"}
  result = json.loads(lines[-1][len(RESULT_PREFIX):])
  return {"status": "ok", "seconds": seconds, "custom_calls": result["custom_calls"], "detail": ""}


def variants(requested: Sequence[str]) -> list[str]:
  """The variants to check: `requested`, or every registered one; unknown names are a UserError."""
  import attention  # pylint: disable=g-import-not-at-top

  valid = attention.names()
  names = [n.strip() for n in requested if n.strip()] or list(valid)
  unknown = [n for n in names if n not in valid]
  if unknown:
    raise cli.UserError(f"unknown attention variant(s) {unknown} in --attention; valid: {', '.join(valid)}")
  return names


def check(names: Sequence[str], *, runs: int, timeout: float, jobs: int, run: Run) -> int:
  """Runs every variant `runs` times, `jobs` at a time, and prints the table; 0 if nothing hung or crashed, else 1."""
  results: dict[str, list[dict]] = {name: [] for name in names}
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    futures = {pool.submit(run_once, name, run, timeout): name for name in names for _ in range(runs)}
    for future in concurrent.futures.as_completed(futures):
      name, result = futures[future], future.result()
      results[name].append(result)
      print(f"{name}: run {len(results[name])}/{runs} {result['status']} ({result['seconds']:.0f}s) "
            f"{result['detail']}", flush=True)
  print(f"\n{runs} fresh processes per variant, {run.num_layers} layers, {run.length} tokens, batch "
        f"{run.batch_size}, {run.steps} steps, timeout {timeout:.0f}s, cpus {run.cpus or 'all'}, "
        f"performer features {run.performer_features}\n")
  print(f"| {'variant':<18} | ok | hang | crash | median s | custom calls in the compiled step |")
  print(f"|{'-' * 20}|----|------|-------|----------|-----------------------------------|")
  failed = False
  for name in names:
    outcomes = results[name]
    count = {s: sum(r["status"] == s for r in outcomes) for s in ("ok", "hang", "crash")}
    failed |= count["hang"] + count["crash"] > 0
    times = sorted(r["seconds"] for r in outcomes if r["status"] == "ok")
    median = f"{times[len(times) // 2]:.1f}" if times else "-"
    calls = next((r["custom_calls"] for r in outcomes if r["custom_calls"] is not None), None)
    calls_text = "-" if calls is None else (", ".join(calls) or "none")
    print(f"| {name:<18} | {count['ok']:>2} | {count['hang']:>4} | {count['crash']:>5} | {median:>8} | {calls_text} |")
  for name in names:
    for r in results[name]:
      if r["status"] == "crash":
        print(f"{name}: {r['detail']}")
        break
  return 1 if failed else 0


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  run = Run(length=_LENGTH.value, num_layers=_NUM_LAYERS.value, batch_size=_BATCH_SIZE.value, steps=_STEPS.value,
            cpus=_CPUS.value, performer_features=_PERFORMER_FEATURES.value)
  if _WORKER.value:
    [name] = _ATTENTION.value
    worker(name, run)
    return 0
  return check(variants(_ATTENTION.value), runs=_RUNS.value, timeout=_TIMEOUT.value, jobs=_JOBS.value, run=run)


if __name__ == "__main__":
  cli.run(main)  # bad flags: one `error:` line, exit status 2
