r"""Context-parallel figures for `scripts/benchmark.py --sequence_parallel=N`: the LRA Text training step (the
project's `Experiment.jit_train_step`, configs/lra/text.py sizes) with its length sharded over N devices
(`config.mesh.data=1, config.mesh.sequence=N`) beside the same step on one device, per variant and length.

  python scripts/benchmark.py --sequence_parallel=8 --memory_only --num_layers=2 --batch_size=1 \
      --attention=softmax,local,longformer,linear,performer --lengths=65536 --output_dir=runs/bench_sp
  python scripts/benchmark.py --sequence_parallel=8 --memory_only --attention=linear,local --lengths=1048576 \
      --no_sequence_baseline --batch_size=1 --output_dir=runs/bench_sp_1m

Per cell: XLA's compiled memory of the step per device (`memory_analysis()` of the SPMD program: arguments +
outputs + temporaries - aliased, one device's share), attention dropout off (see `measure`), compile seconds and,
unless `--memory_only`, steps/s. On a CPU
host the worker gets N fake devices (`--xla_force_host_platform_device_count=N`, set before jax starts); on GPU/TPU
hosts it uses the first N real devices. Each cell runs in its own worker process (`lra/pool.py`, the pool
benchmark.py and sweep.py use; logs in `<output_dir>/logs`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from lra import pool  # noqa: E402  (after the path set-up)
from lra import tables  # noqa: E402


def _memory(compiled: Any) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  get = lambda k: int(getattr(analysis, f"{k}_size_in_bytes", 0) or 0)  # noqa: E731
  return get("argument") + get("output") + get("temp") - get("alias")


def measure(variant: str, length: int, sequence: int, *, num_layers: int, batch_size: int, dtype: str, steps: int,
            memory_only: bool) -> dict[str, Any]:
  """Compiles (and unless `memory_only`, times) one training step with `mesh.sequence=sequence`."""
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from configs.lra import text
  from lra.tasks import byte_tokens
  from lra.training import sharding, trainer

  config = text.get_config(f"attention={variant}")
  config.model.num_layers = num_layers
  config.model.dtype = dtype
  config.data.max_length = length
  # Attention dropout off on both sides of the ratio: the ring and the halo forms serve dropout-free calls (softmax's
  # and block-sparse dropout masks are not yet keyed by global positions everywhere); with it they take the fallback.
  config.model.attention_dropout_rate = 0.0
  config.train.batch_size = config.train.eval_batch_size = batch_size
  config.mesh.update(data=1, sequence=sequence, distributed="false")
  exp = trainer.Experiment(config)
  state = exp.init_state()
  rng = np.random.default_rng(length)
  batch = exp.task.dummy_batch(batch_size)
  batch["inputs"] = rng.integers(byte_tokens.NUM_RESERVED, byte_tokens.VOCAB_SIZE, batch["inputs"].shape).astype(
      batch["inputs"].dtype)
  batch = sharding.to_global(batch, exp.batch_sharding)
  t0 = time.perf_counter()
  compiled = exp.jit_train_step.lower(state, batch, exp.key).compile()
  out: dict[str, Any] = {"variant": variant, "length": length, "sequence": sequence,
                         "compile_s": time.perf_counter() - t0, "memory_bytes": _memory(compiled)}
  if not memory_only:
    state, metrics = compiled(state, batch, exp.key)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch, exp.key)
    jax.block_until_ready(metrics)
    out["steps_per_s"] = steps / max(time.perf_counter() - t0, 1e-12)
  return out


def run(variants: Sequence[str], lengths: Sequence[int], sequence: int, *, num_layers: int, batch_size: int,
        dtype: str, steps: int, memory_only: bool, output_dir: str | Path, baseline: bool = True,
        timeout: float = 1800.0) -> str:
  """Measures every (variant, length) at `sequence=1` (if `baseline`) and `sequence`; writes
  `sequence_parallel.md` / `.jsonl` into `output_dir` and returns the markdown."""
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  env = {}
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={sequence}".strip()
  seqs = ([1] if baseline and sequence > 1 else []) + [sequence]
  cells = {f"{variant}.{length}.sequence={seq}": dict(
      variant=variant, length=length, sequence=seq, num_layers=num_layers, batch_size=batch_size, dtype=dtype,
      steps=steps, memory_only=memory_only) for variant in variants for length in lengths for seq in seqs}
  # Every cell in a fresh process (the memory of one must not be another's), one at a time, each with a time limit.
  jobs = [pool.python_job(name, _measure_cell, [(args,)], work_dir=output_dir / "logs" / "calls", env=env)
          for name, args in cells.items()]
  records: list[dict[str, Any]] = []

  def on_outcome(outcome: pool.Outcome) -> None:
    args = cells[outcome.job]
    if outcome.status == "ok":
      rec = {k: v for k, v in outcome.record.items() if k != "status"}
    else:
      rec = {**args, "error": (outcome.error if outcome.status == "error" else
                               f"{outcome.status}: {outcome.error}")[:300]}
    records.append(rec)
    print(json.dumps(rec), file=sys.stderr, flush=True)

  pool.run(jobs, log_dir=output_dir / "logs", timeout=timeout, on_outcome=on_outcome, cwd=ROOT)
  (output_dir / "sequence_parallel.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  text = markdown(records, sequence, num_layers, batch_size, dtype, memory_only)
  (output_dir / "sequence_parallel.md").write_text(text)
  return text


def _mib(n: float | None) -> str:
  return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def markdown(records: Sequence[dict[str, Any]], sequence: int, num_layers: int, batch_size: int, dtype: str,
             memory_only: bool) -> str:
  lines = [f"Training step, LRA Text encoder ({num_layers} layers, emb 256, 4 heads, MLP 1024), batch {batch_size}, "
           f"{dtype}: per-device compiled memory (XLA memory analysis) at mesh.sequence=1 and {sequence}.", ""]
  by_key = {(r["variant"], r["length"], r["sequence"]): r for r in records}
  columns = ["variant", "tokens", "sequence=1", f"sequence={sequence}", "ratio"] + ([] if memory_only else ["steps/s"])

  def cell(r):
    return "-" if r is None else (f"error: {r['error']}" if r.get("error") else _mib(r["memory_bytes"]))

  table_rows = []
  for variant, length in dict.fromkeys((r["variant"], r["length"]) for r in records):
    one, many = by_key.get((variant, length, 1)), by_key.get((variant, length, sequence))
    ratio = "-"
    if one and many and one.get("memory_bytes") and many.get("memory_bytes"):
      ratio = f"{many['memory_bytes'] / one['memory_bytes']:.3f}"
    row = {"variant": variant, "tokens": f"{length:,}", "sequence=1": cell(one), f"sequence={sequence}": cell(many),
           "ratio": ratio}
    if not memory_only:
      sps = many.get("steps_per_s") if many else None
      row["steps/s"] = f"{sps:.3g}" if sps and math.isfinite(sps) else "-"
    table_rows.append(row)
  lines.append(tables.markdown(table_rows, columns))
  return "\n".join(lines) + "\n"


def _measure_cell(args: dict[str, Any]) -> dict[str, Any]:
  return measure(**args)
