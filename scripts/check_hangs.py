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

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "CHECK_HANGS_RESULT "
FEATURES = ("gram_schmidt", "lapack_qr")


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


def worker(args: argparse.Namespace) -> None:
  """One run in this process: build, compile, step; prints one JSON result line."""
  if args.cpus:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(ROOT))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs.lra import listops  # pylint: disable=g-import-not-at-top
  from lra.training import trainer  # pylint: disable=g-import-not-at-top

  if args.performer_features == "lapack_qr":
    _use_lapack_qr()
  config = listops.get_config(f"runlocal,attention={args.attention}")
  config.data.max_length = args.length
  config.model.num_layers = args.num_layers
  config.train.batch_size = args.batch_size
  experiment = trainer.Experiment(config)
  state = experiment.init_state()
  rng = np.random.default_rng(0)
  batch = experiment.task.dummy_batch(args.batch_size)
  batch["inputs"] = rng.integers(1, 16, batch["inputs"].shape).astype(batch["inputs"].dtype)
  batch["targets"] = rng.integers(0, 10, batch["targets"].shape).astype(batch["targets"].dtype)
  batch = {k: jax.device_put(v, experiment.batch_sharding) for k, v in batch.items()}
  step = experiment.jit_train_step
  compiled = step.lower(state, batch, experiment.key).compile()
  calls = custom_call_targets(compiled.as_text())
  loss = None
  for _ in range(args.steps):
    state, metrics = step(state, batch, experiment.key)
    loss = float(metrics["loss"])
  print(RESULT_PREFIX + json.dumps({"custom_calls": calls, "loss": loss}), flush=True)


def run_once(args: argparse.Namespace, name: str) -> dict:
  """One fresh process; {"status": "ok"|"hang"|"crash", "seconds", "custom_calls", "detail"}."""
  command = [sys.executable, str(Path(__file__).resolve()), "--worker", f"--attention={name}",
             f"--length={args.length}", f"--num_layers={args.num_layers}", f"--batch_size={args.batch_size}",
             f"--steps={args.steps}", f"--cpus={args.cpus}", f"--performer_features={args.performer_features}"]
  start = time.monotonic()
  # A new session so a hung run is killed with every thread and child it has.
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    out, err = proc.communicate(timeout=args.timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return {"status": "hang", "seconds": time.monotonic() - start, "custom_calls": None,
            "detail": f"no exit within {args.timeout}s"}
  seconds = time.monotonic() - start
  lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
  if proc.returncode != 0 or not lines:
    lines = err.strip().splitlines() or ["(no output)"]
    tail = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), lines[-1])
    return {"status": "crash", "seconds": seconds, "custom_calls": None,
            "detail": f"exit status {proc.returncode}: {tail}"}
  result = json.loads(lines[-1][len(RESULT_PREFIX):])
  return {"status": "ok", "seconds": seconds, "custom_calls": result["custom_calls"], "detail": ""}


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--attention", default="", help="comma-separated variants (default: every registered one)")
  parser.add_argument("--runs", type=int, default=10, help="fresh processes per variant")
  parser.add_argument("--timeout", type=float, default=240.0, help="seconds one run may take before it is a hang")
  parser.add_argument("--jobs", type=int, default=2, help="runs at a time (contention makes races likelier)")
  parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3, help="training steps per run after compiling")
  parser.add_argument("--cpus", type=int, default=0, help="pin each run to this many cores (0: all available)")
  parser.add_argument("--performer_features", default="gram_schmidt", choices=FEATURES,
                      help="lapack_qr reinstates the old batched-QR draw, to show the deadlock this check guards")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for flag in ("runs", "jobs", "length", "num_layers", "batch_size", "steps"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  if args.timeout <= 0 or args.cpus < 0:
    parser.error(f"--timeout must be > 0 and --cpus >= 0, got {args.timeout} and {args.cpus}")
  return args


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  if args.worker:
    worker(args)
    return 0
  sys.path.insert(0, str(ROOT))
  import attention  # pylint: disable=g-import-not-at-top

  valid = attention.names()
  names = [n.strip() for n in args.attention.split(",") if n.strip()] or list(valid)
  unknown = [n for n in names if n not in valid]
  if unknown:
    print(f"error: unknown attention variant(s) {unknown} in --attention; valid: {', '.join(valid)}", file=sys.stderr)
    return 2
  results: dict[str, list[dict]] = {name: [] for name in names}
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {pool.submit(run_once, args, name): name for name in names for _ in range(args.runs)}
    for future in concurrent.futures.as_completed(futures):
      name, result = futures[future], future.result()
      results[name].append(result)
      print(f"{name}: run {len(results[name])}/{args.runs} {result['status']} ({result['seconds']:.0f}s) "
            f"{result['detail']}", flush=True)
  print(f"\n{args.runs} fresh processes per variant, {args.num_layers} layers, {args.length} tokens, batch "
        f"{args.batch_size}, {args.steps} steps, timeout {args.timeout:.0f}s, cpus {args.cpus or 'all'}, "
        f"performer features {args.performer_features}\n")
  print(f"| {'variant':<18} | ok | hang | crash | median s | custom calls in the compiled step |")
  print(f"|{'-' * 20}|----|------|-------|----------|-----------------------------------|")
  failed = False
  for name in names:
    runs = results[name]
    count = {s: sum(r["status"] == s for r in runs) for s in ("ok", "hang", "crash")}
    failed |= count["hang"] + count["crash"] > 0
    times = sorted(r["seconds"] for r in runs if r["status"] == "ok")
    median = f"{times[len(times) // 2]:.1f}" if times else "-"
    calls = next((r["custom_calls"] for r in runs if r["custom_calls"] is not None), None)
    calls_text = "-" if calls is None else (", ".join(calls) or "none")
    print(f"| {name:<18} | {count['ok']:>2} | {count['hang']:>4} | {count['crash']:>5} | {median:>8} | {calls_text} |")
  for name in names:
    for r in results[name]:
      if r["status"] == "crash":
        print(f"{name}: {r['detail']}")
        break
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
