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
hosts it uses the first N real devices. Each variant runs in its own worker process (this module as a script).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]


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
  env = dict(os.environ)
  if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={sequence}".strip()
  env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
  records: list[dict[str, Any]] = []
  seqs = ([1] if baseline and sequence > 1 else []) + [sequence]
  for variant in variants:
    for length in lengths:
      for seq in seqs:
        args = dict(variant=variant, length=length, sequence=seq, num_layers=num_layers, batch_size=batch_size,
                    dtype=dtype, steps=steps, memory_only=memory_only)
        try:
          proc = subprocess.run([sys.executable, __file__, json.dumps(args)], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=timeout, check=False)
          lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
          rec = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
              **args, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        except subprocess.TimeoutExpired:
          rec = {**args, "error": f"timeout after {timeout:.0f} s"}
        records.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
  (output_dir / "sequence_parallel.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  text = markdown(records, sequence, num_layers, batch_size, dtype, memory_only)
  (output_dir / "sequence_parallel.md").write_text(text)
  return text


def _mib(n: float | None) -> str:
  return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def markdown(records: Sequence[dict[str, Any]], sequence: int, num_layers: int, batch_size: int, dtype: str,
             memory_only: bool) -> str:
  lines = [f"Training step, LRA Text encoder ({num_layers} layers, emb 256, 4 heads, MLP 1024), batch {batch_size}, "
           f"{dtype}: per-device compiled memory (XLA memory analysis) at mesh.sequence=1 and {sequence}.", "",
           f"| variant | tokens | sequence=1 | sequence={sequence} | ratio |" + ("" if memory_only else " steps/s |"),
           "|---|---|---|---|---|" + ("" if memory_only else "---|")]
  by_key = {(r["variant"], r["length"], r["sequence"]): r for r in records}
  for variant, length in dict.fromkeys((r["variant"], r["length"]) for r in records):
    one, many = by_key.get((variant, length, 1)), by_key.get((variant, length, sequence))
    def cell(r):
      return "-" if r is None else (f"error: {r['error']}" if r.get("error") else _mib(r["memory_bytes"]))
    ratio = "-"
    if one and many and one.get("memory_bytes") and many.get("memory_bytes"):
      ratio = f"{many['memory_bytes'] / one['memory_bytes']:.3f}"
    row = f"| {variant} | {length:,} | {cell(one)} | {cell(many)} | {ratio} |"
    if not memory_only:
      sps = many.get("steps_per_s") if many else None
      row += f" {sps:.3g} |" if sps and math.isfinite(sps) else " - |"
    lines.append(row)
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  print(json.dumps(measure(**json.loads(sys.argv[1]))), flush=True)
