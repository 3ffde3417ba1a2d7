r"""The LRA Table 2 efficiency table in one command: a whole training step of the LRA Text encoder for every attention
variant, compiled and timed side by side, with steps/s and memory relative to BOTH softmax baselines at each length:
`softmax` at its default (flash attention: `kernels.softmax`'s XLA flash form on CPU, the Pallas flash kernels on
GPU/TPU, dropout inside) and `softmax-dense` (`softmax` with implementation="reference": the dense `[B, H, L, L]`
form, what LRA's Transformer row measured). Both are always measured.

  python scripts/benchmark.py --output_dir=runs/benchmark                     # every variant at 1K, 2K, 3K, 4K
  python scripts/benchmark.py --attention=softmax,local,linear --lengths=1024,2048 --output_dir=/tmp/bench
  python scripts/benchmark.py --dtype=bfloat16 --lengths=4096,8192,16384 --output_dir=runs/bench_gpu   # on a GPU
  python scripts/benchmark.py --memory_only --num_layers=1 --lengths=2048,8192 --output_dir=runs/bench_mem
  python scripts/benchmark.py --core=softmax --lengths=8192 --core_dropout=0.1 --output_dir=runs/core   # one core
  python scripts/benchmark.py --core=block_sparse --memory_only --lengths=2048,8192 --output_dir=runs/core_bs

`--core=softmax|block_sparse|linear|flex` (scripts/benchmark_core.py) measures one functional core instead of the training step: forward + backward
(`jit(value_and_grad)` of `sum(core(q, k, v) * ct)` w.r.t. q, k, v) at `--core_batch`, `--core_heads`,
`--core_head_dim`, float32 or `--dtype`, `--core_causal`, `--core_dropout`; its default implementation and its
"reference" side by side with flash and dense softmax, in one process: time per call and compiled memory, and ratios
to both softmax baselines (`core.md`, `core.csv`). block_sparse runs a band layout (`--core_block_size`,
`--core_band` blocks wide); linear takes elu+1 feature maps of q and k. flex runs the masks of issue 33 (causal,
sliding window 512, dilated, longformer, bigbird, sparse_transformer; `flex_masks`) with 128-token tiles beside
flash softmax (full and causal), and adds per mask the fraction of tiles visited and the time over
(fraction x flash softmax's time): `python scripts/benchmark.py --core=flex --lengths=8192,16384 --core_dropout=0.1
--output_dir=runs/core_flex`.

The step is the project's own: `lra.training.trainer.Experiment` builds the Text task's model from
configs/lra/text.py (its sizes: emb 256, 4 heads, qkv 256, MLP 1024, dropout, CLS pooling, sinusoidal positions, AdamW)
with `--num_layers`, `--batch_size` and `max_length = length`, and `train_step` (forward, backward, optimizer update,
donated state) runs on random token batches, so no dataset is read. With CLS pooling the attention layers see
length + 1 positions, as in LRA. `--dtype=bfloat16` sets `config.model.dtype`: activations and matmuls in bfloat16,
parameters, optimizer state, softmax normalizers and the loss in float32.

Per cell (variant x length) it records:
  * steps/s: `--steps` steps after `--warmup` steps, timed together (dispatch pipelined, blocked at the end);
  * compiled memory: XLA's plan for the jitted step, `jit(step).lower(...).compile().memory_analysis()`:
    arguments + outputs + temporaries - aliased (donated) bytes; deterministic, available on every backend;
  * peak memory: the device's `memory_stats()["peak_bytes_in_use"]` where the backend reports it (GPU, TPU; not
    CPU). It is the process's peak so far; lengths run in increasing order, so it is the cell's own peak unless a
    shorter length needed more (`--process_per_cell` gives every cell a fresh process).

Each variant runs in its own subprocess (this script with `--worker`), so a crash or a hang is a cell ("error: <last
line>", "timeout") and the run goes on; after a timeout the variant's longer lengths are skipped. Writes
`benchmark.md` (markdown table with LRA Table 2's published speed-ups and memory beside ours, and a header naming
command, date, machine and jax version), `benchmark.csv` (every figure) and `benchmark.png` (steps/s and memory against
length, log-log, one line per variant) into `--output_dir`, and prints the markdown at the end. The parent process
never initialises a jax backend (it would take accelerator memory from the workers).

For tests: the environment variable BENCHMARK_FAULT="variant=crash|hang|error[@length],..." makes the worker of that
variant exit abruptly, sleep forever, or raise, before the given length (every length if none is given).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app
from absl import flags

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/benchmark.py` from anywhere
  sys.path.insert(0, str(ROOT))

if str(ROOT / "scripts") not in sys.path:  # the core benchmark beside this file (also when loaded by path in tests)
  sys.path.insert(0, str(ROOT / "scripts"))

from lra import cli  # noqa: E402  (after the path set-up)
from lra import pool  # noqa: E402
from lra import tables  # noqa: E402
# The core benchmark (`--core`) lives in scripts/benchmark_core.py with the figure helpers both tables use.
from benchmark_core import (BASELINE, BASELINES, CORES, DENSE, FLEX_MASK_NAMES, core_functions,  # noqa: E402,F401
                            core_markdown, core_rows, error_line, flex_masks, flex_visited, header_block,
                            jaxlib_version, length_label, measure_core, memory_figures, mib, ratio, run_core,
                            write_csv)

DEFAULT_LENGTHS = (1024, 2048, 3072, 4096)
FAULT_ENV = "BENCHMARK_FAULT"
FILES = ("benchmark.md", "benchmark.csv", "benchmark.png")

# Tay et al. 2020, "Long Range Arena", Table 2: byte-level Text, batch 32 on 4x4 TPU v3 chips; steps per second and
# peak memory (GB per device) at 1K, 2K, 3K, 4K tokens. Keyed by our registered names; None = not published (Sparse
# Trans. and Longformer were left out of the efficiency benchmark: mask-based implementations) or not known here.
# The 4K column was checked against a summary of the paper's Table 2 in this session; the 1K-3K columns are recalled,
# not checked against the paper (`LRA_VERIFIED_LENGTHS`), and are marked "?" in the table.
LRA_LENGTHS = (1024, 2048, 3072, 4096)
LRA_VERIFIED_LENGTHS = (4096,)
LRA_TABLE2: dict[str, tuple[str, tuple[float | None, ...], tuple[float | None, ...]]] = {
    "softmax": ("Transformer", (8.1, 4.9, 2.3, 1.4), (0.85, 2.65, 5.51, 9.48)),
    "local": ("Local Attention", (9.2, 8.4, 7.4, 7.4), (0.42, 0.76, 1.06, 1.37)),
    "linformer": ("Linformer", (9.3, 9.1, 8.5, 7.7), (0.37, 0.55, None, 0.99)),
    "reformer": ("Reformer", (4.4, 2.2, 1.5, 1.1), (0.48, 0.99, 1.53, 2.28)),
    "sinkhorn": ("Sinkhorn Trans.", (9.1, 7.9, 6.6, 5.3), (0.47, 0.83, 1.13, 1.48)),
    "synthesizer": ("Synthesizer", (8.7, 5.7, None, 1.9), (0.65, 1.98, 4.09, 6.99)),
    "bigbird": ("BigBird", (7.4, 3.9, 2.7, 1.5), (0.77, 1.49, 2.18, 2.88)),
    "linear": ("Linear Trans.", (9.1, 9.3, 8.6, 7.8), (0.37, 0.57, 0.80, 1.03)),
    "performer": ("Performer", (9.5, 9.4, 8.7, 8.0), (0.37, 0.59, 0.82, 1.06)),
    "sparse_transformer": ("Sparse Trans.", (None,) * 4, (None,) * 4),
    "longformer": ("Longformer", (None,) * 4, (None,) * 4),
}

_ATTENTION = flags.DEFINE_list("attention", None, "Variants to measure (default: every registered one); the baselines "
                               "of every ratio, softmax (flash) and softmax-dense, are always added.")
_LENGTHS = flags.DEFINE_list("lengths", [str(n) for n in DEFAULT_LENGTHS], "Sequence lengths (tokens).")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Encoder layers.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "Examples per step.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per cell.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_TIMEOUT = flags.DEFINE_float("timeout", 900.0, "Seconds one cell (compile + warmup + steps; a worker's "
                             "first cell also its start-up) may take.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where benchmark.md, benchmark.csv and benchmark.png go.")
_IMPLEMENTATION = flags.DEFINE_enum(
    "implementation", "auto", ["auto", "xla", "pallas"], "The attention `implementation` option of every variant that "
    "has one: auto leaves it at None (Pallas kernels where the lowering platform's kernel serves the call, else XLA "
    "with a logged reason); xla or pallas force it (kernels vs XLA: two runs on the same device).")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "Only compile and read XLA's memory analysis (no timing).")
_PROCESS_PER_CELL = flags.DEFINE_bool("process_per_cell", False, "A fresh worker process for every cell (exact "
                                      "per-cell device peak memory; slower start-up).")
_MARKDOWN_HEADER = flags.DEFINE_bool("markdown_header", True, "Open benchmark.md with command, date, machine, device "
                                     "and jax version.")
_ATTENTION_DROPOUT = flags.DEFINE_float("attention_dropout_rate", None, "Attention dropout of every variant "
                                         "(default: the Text config's, 0.1).")
_CORE = flags.DEFINE_enum("core", None, list(CORES), "Measure this functional core (forward + backward) instead of "
                          "the training step.")
_CORE_BATCH = flags.DEFINE_integer("core_batch", 2, "--core: batch.")
_CORE_HEADS = flags.DEFINE_integer("core_heads", 4, "--core: heads.")
_CORE_HEAD_DIM = flags.DEFINE_integer("core_head_dim", 64, "--core: head dim.")
_CORE_CAUSAL = flags.DEFINE_bool("core_causal", False, "--core: causal attention.")
_CORE_DROPOUT = flags.DEFINE_float("core_dropout", 0.0, "--core: attention dropout (softmax and block_sparse).")
_CORE_BLOCK_SIZE = flags.DEFINE_integer("core_block_size", 64, "--core=block_sparse: layout block size.")
_CORE_BAND = flags.DEFINE_integer("core_band", 3, "--core=block_sparse: band width of the layout, in blocks.")
_SEQUENCE_PARALLEL = flags.DEFINE_integer(
    "sequence_parallel", 1, "N > 1: context-parallel figures instead of the table: per-device memory and steps/s of "
    "the step with its length sharded over N devices beside one device (scripts/benchmark_sequence.py).")
_SEQUENCE_BASELINE = flags.DEFINE_bool("sequence_baseline", True, "With --sequence_parallel: also measure "
                                       "mesh.sequence=1 (the ratio's denominator).")
_WORKER = flags.DEFINE_string("worker", None, "Internal: measure this variant in this process, print JSON lines.")


# ----------------------------------------------------------------------------------------------------------------------
# Worker: one variant, its lengths, in this process.


def _fault(variant: str, length: int) -> None:
  """The BENCHMARK_FAULT test hook (see the module docstring)."""
  for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
    name, _, action = item.partition("=")
    action, _, at = action.partition("@")
    if name.strip() != variant or (at and int(at) != length):
      continue
    if action == "crash":
      print(f"BENCHMARK_FAULT: simulated crash of {variant} at length {length}", file=sys.stderr, flush=True)
      os._exit(3)
    if action == "hang":
      while True:
        time.sleep(60)
    if action == "error":
      raise RuntimeError(f"BENCHMARK_FAULT: simulated error of {variant} at length {length}")
    raise ValueError(f"{FAULT_ENV} action {action!r} must be crash, hang or error")



def _peak_bytes(device: Any) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without allocator statistics
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _attention_of(variant: str) -> tuple[str, str | None]:
  """(registered attention name, forced implementation) of a table row: `softmax-dense` is softmax's reference."""
  return ("softmax", "reference") if variant == DENSE else (variant, None)


def _config(variant: str, length: int, num_layers: int, batch_size: int):
  from configs.lra import text  # pylint: disable=import-outside-toplevel
  config = text.get_config(f"attention={_attention_of(variant)[0]}")
  config.model.num_layers = num_layers
  config.data.max_length = length
  config.train.batch_size = config.train.eval_batch_size = batch_size
  config.mesh.data = 1  # one device: the table compares attention, not data parallelism
  config.mesh.distributed = "false"
  return config


def measure(variant: str, length: int, *, num_layers: int, batch_size: int, dtype: str, steps: int, warmup: int,
            memory_only: bool, implementation: str = "auto",
            attention_dropout_rate: float | None = None) -> dict[str, Any]:
  """Compiles (and unless `memory_only`, times) one training step of the Text encoder; figures as a dict."""
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from lra.tasks import byte_tokens
  from lra.training import sharding, trainer

  config = _config(variant, length, num_layers, batch_size)
  config.model.dtype = dtype  # the encoder computes in it; parameters and optimizer state stay float32
  from attention import registry  # pylint: disable=import-outside-toplevel
  name, forced = _attention_of(variant)
  if attention_dropout_rate is not None:
    config.model.attention_dropout_rate = attention_dropout_rate
  if forced is not None:
    config.model.attention.implementation = forced
  elif implementation != "auto" and "implementation" in registry.options(name):
    config.model.attention.implementation = implementation
  exp = trainer.Experiment(config)
  state = exp.init_state()

  rng = np.random.default_rng(length)
  batch = exp.task.dummy_batch(batch_size)
  batch["inputs"] = rng.integers(byte_tokens.NUM_RESERVED, byte_tokens.VOCAB_SIZE, batch["inputs"].shape).astype(
      batch["inputs"].dtype)
  batch["targets"] = rng.integers(0, exp.task.num_classes, batch["targets"].shape).astype(batch["targets"].dtype)
  batch = sharding.to_global(batch, exp.batch_sharding)

  t0 = time.perf_counter()
  compiled = exp.jit_train_step.lower(state, batch, exp.key).compile()
  out: dict[str, Any] = {"compile_s": time.perf_counter() - t0, **memory_figures(compiled)}
  if memory_only:
    return out
  metrics = None
  for _ in range(warmup):
    state, metrics = compiled(state, batch, exp.key)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, exp.key)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t0
  loss = float(metrics["loss"]) if metrics is not None else math.nan
  if not math.isfinite(loss):
    raise FloatingPointError(f"non-finite training loss {loss} after {warmup + steps} steps")
  out.update(steps_per_s=steps / max(elapsed, 1e-12), step_ms=1e3 * elapsed / max(steps, 1), loss=loss,
             peak_bytes=_peak_bytes(jax.devices()[0]))
  return out


def run_worker(variant: str, lengths: Sequence[int], **options: Any) -> None:
  """Measures `variant` at each length, printing one JSON line per cell; an exception is that cell's error."""
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  pool.emit_info({"platform": device.platform, "device_kind": device.device_kind,
         "num_devices": jax.device_count(), "jax_version": jax.__version__,
         "jaxlib_version": getattr(jax.lib, "__version__", None) or jaxlib_version()})
  for length in lengths:
    record: dict[str, Any] = {"variant": variant, "length": length}
    try:
      _fault(variant, length)
      record.update(status="ok", **measure(variant, length, **options))
    except Exception as e:  # pylint: disable=broad-except  # one failing cell must not end the variant's row
      traceback.print_exc()  # the whole story goes to the worker's log in <output_dir>/logs
      message = error_line(e)
      record.update(status="oom" if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()
                    else "error", error=message)
    pool.emit(record)


# ----------------------------------------------------------------------------------------------------------------------
# Parent: one worker process per variant, a time limit per cell.


@dataclasses.dataclass
class Cell:
  variant: str
  length: int
  status: str  # ok | error | oom | timeout | skipped
  figures: dict[str, Any] = dataclasses.field(default_factory=dict)
  error: str = ""


def _worker_command(variant: str, lengths: Sequence[int], options: dict[str, Any]) -> list[str]:
  cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={variant}",
         f"--lengths={','.join(map(str, lengths))}"]
  for key, value in options.items():
    if value is None:  # an unset optional flag: the worker's default
      continue
    cmd.append(f"--{key}={value}" if not isinstance(value, bool) else f"--{'' if value else 'no'}{key}")
  return cmd


# ----------------------------------------------------------------------------------------------------------------------
# Tables, CSV and plot.


def _lra(variant: str, length: int) -> tuple[str, float | None, float | None, bool]:
  """LRA Table 2's name, speed-up and memory ratio (relative to Transformer) for `variant` at `length`, and whether
  the numbers were verified; None where not published or `length` is not one of LRA's."""
  if variant == BASELINE:  # flash attention is not in LRA's table
    return "", None, None, False
  if variant == DENSE:  # LRA's Transformer: its ratio is 1 by definition
    return LRA_TABLE2[BASELINE][0], None, None, False
  if variant not in LRA_TABLE2:
    return "", None, None, False
  name, speeds, memories = LRA_TABLE2[variant]
  if length not in LRA_LENGTHS:
    return name, None, None, False
  i = LRA_LENGTHS.index(length)
  base_speed, base_memory = LRA_TABLE2[BASELINE][1][i], LRA_TABLE2[BASELINE][2][i]
  speed = speeds[i] / base_speed if speeds[i] is not None else None
  memory = memories[i] / base_memory if memories[i] is not None else None
  return name, speed, memory, length in LRA_VERIFIED_LENGTHS


def rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
  """One CSV row per cell, with ratios to both softmax baselines at the same length (`speedup`, `memory_ratio`,
  `peak_ratio`: to flash softmax; `*_dense`: to softmax-dense) and LRA's published ratios (to its dense
  Transformer)."""
  base = {c.length: c.figures for c in cells if c.variant == BASELINE and c.status == "ok"}
  dense = {c.length: c.figures for c in cells if c.variant == DENSE and c.status == "ok"}
  out = []
  for c in cells:
    f, b, d = c.figures, base.get(c.length, {}), dense.get(c.length, {})
    lra_name, lra_speed, lra_memory, verified = _lra(c.variant, c.length)
    ratios = {}
    for suffix, ref in (("", b), ("_dense", d)):
      ratios.update({f"speedup{suffix}": ratio(f.get("steps_per_s"), ref.get("steps_per_s")),
                     f"memory_ratio{suffix}": ratio(f.get("memory_bytes"), ref.get("memory_bytes")),
                     f"peak_ratio{suffix}": ratio(f.get("peak_bytes"), ref.get("peak_bytes"))})
    out.append({
        "variant": c.variant, "lra_name": lra_name, "length": c.length, "status": c.status,
        "steps_per_s": f.get("steps_per_s"), "speedup": ratios["speedup"], "speedup_dense": ratios["speedup_dense"],
        "memory_bytes": f.get("memory_bytes"), "memory_ratio": ratios["memory_ratio"],
        "memory_ratio_dense": ratios["memory_ratio_dense"], "peak_bytes": f.get("peak_bytes"),
        "peak_ratio": ratios["peak_ratio"], "peak_ratio_dense": ratios["peak_ratio_dense"],
        "temp_bytes": f.get("temp_bytes"), "argument_bytes": f.get("argument_bytes"),
        "output_bytes": f.get("output_bytes"), "alias_bytes": f.get("alias_bytes"), "step_ms": f.get("step_ms"),
        "compile_s": f.get("compile_s"), "loss": f.get("loss"), "lra_speedup": lra_speed,
        "lra_memory_ratio": lra_memory, "lra_verified": verified if lra_name else None, "error": c.error})
  return out


def _cell_text(row: dict[str, Any], value_key: str, lra_key: str | None, fmt: str) -> str:
  if row["status"] != "ok":
    text = {"timeout": "timeout", "skipped": "skipped", "oom": "OOM"}.get(row["status"], "")
    if row["status"] == "error":
      text = "error: " + row["error"]
    text = text.replace("|", "/")
    return text if len(text) <= 70 else text[:67] + "..."
  value = row[value_key]
  text = "-" if value is None else fmt.format(value)
  lra = row[lra_key] if lra_key else None
  if lra is not None and row["variant"] not in BASELINES:  # the dense baseline's published ratio is 1 by definition
    text += f" ({fmt.format(lra)}{'' if row['lra_verified'] else '?'})"
  return text


def markdown(table_rows: Sequence[dict[str, Any]], lengths: Sequence[int], header: str | None,
             memory_only: bool, title: str | None = None) -> str:
  """The speed-up and memory tables against flash softmax and against dense softmax (LRA Table 2, whose baseline is
  dense, in parentheses beside the latter), the baselines' absolute figures and notes."""
  by = {(r["variant"], r["length"]): r for r in table_rows}
  variants = list(dict.fromkeys(r["variant"] for r in table_rows))
  out = io.StringIO()
  if title:
    out.write(f"## {title}\n\n")
  if header:
    out.write(header + "\n\n")
  labels = [length_label(n) for n in lengths]
  flash, dense = "softmax (flash, the default)", "softmax-dense (implementation=\"reference\")"
  sections = [(f"Compiled step memory relative to {flash}", "memory_ratio", None, "{:.2f}"),
              (f"Compiled step memory relative to {dense}", "memory_ratio_dense", "lra_memory_ratio", "{:.2f}")]
  if not memory_only:
    sections[:0] = [(f"Speed-up over {flash} (steps/s ratio)", "speedup", None, "{:.2f}×"),
                    (f"Speed-up over {dense} (steps/s ratio)", "speedup_dense", "lra_speedup", "{:.2f}×")]
  if any(r["peak_bytes"] is not None for r in table_rows):
    sections += [(f"Device peak memory relative to {flash}", "peak_ratio", None, "{:.2f}"),
                 (f"Device peak memory relative to {dense}", "peak_ratio_dense", "lra_memory_ratio", "{:.2f}")]
  for section, key, lra_key, fmt in sections:
    out.write(f"### {section}{'; LRA Table 2 in parentheses' if lra_key else ''}\n\n")
    section_rows = []
    for v in variants:
      name = next((r["lra_name"] for r in table_rows if r["variant"] == v), "") or "-"
      section_rows.append({"variant": v, "LRA name": name, **{
          label: _cell_text(by[(v, n)], key, lra_key, fmt) if (v, n) in by else "-"
          for label, n in zip(labels, lengths)}})
    out.write(tables.markdown(section_rows, ["variant", "LRA name", *labels], align=dict.fromkeys(labels, "right"))
              + "\n\n")
  baseline_rows = []
  for variant in BASELINES:
    for n in lengths:
      r = by.get((variant, n))
      if r is None:
        continue
      sps = "-" if r["steps_per_s"] is None else f"{r['steps_per_s']:.3g}"
      baseline_rows.append({"baseline": variant, "length": length_label(n),
                            "steps/s": sps if r["status"] == "ok" else r["status"],
                            "compiled memory": mib(r["memory_bytes"]), "device peak": mib(r["peak_bytes"])})
  numbers = ("length", "steps/s", "compiled memory", "device peak")
  out.write("### The baselines, absolute\n\n" + tables.markdown(
      baseline_rows, ["baseline", *numbers], align=dict.fromkeys(numbers, "right")) + "\n")
  short = shortfalls(table_rows, memory_only)
  if short:
    out.write("\n### Below LRA Table 2 (ratios to dense softmax, as LRA's)\n\n")
    out.write("".join(f"- {line}\n" for line in short))
  out.write("\nCompiled memory: XLA's plan for the whole jitted step (arguments + outputs + temporaries - donated "
            "aliases). softmax is flash attention (kernels.softmax's default: no [L, L] buffer, dropout inside); "
            "softmax-dense is the same layer with implementation=\"reference\" (the dense form LRA's Transformer "
            "measured). LRA Table 2 (Tay et al. 2020): byte-level Text, batch 32, 4x4 TPU v3, peak memory per device; "
            "ratios computed from its steps/s and GB; \"?\" marks published values recalled but not checked against "
            "the paper; LRA gives no speed or memory for Sparse Trans. and Longformer.\n")
  return out.getvalue()


def shortfalls(table_rows: Sequence[dict[str, Any]], memory_only: bool) -> list[str]:
  """One line per variant and length where we are slower or use relatively more memory than LRA Table 2 reports,
  both as ratios to the dense softmax (LRA's baseline)."""
  out = []
  for r in table_rows:
    if r["variant"] in BASELINES or r["status"] != "ok":
      continue
    mark = "" if r["lra_verified"] else "?"
    speed, memory = r["speedup_dense"], r["memory_ratio_dense"]
    slower = not memory_only and None not in (speed, r["lra_speedup"]) and speed < r["lra_speedup"]
    heavier = None not in (memory, r["lra_memory_ratio"]) and memory > r["lra_memory_ratio"]
    parts = []
    if slower:
      parts.append(f"speed-up over dense {speed:.2f}× < {r['lra_speedup']:.2f}×{mark}")
    if heavier:
      parts.append(f"memory vs dense {memory:.2f} > {r['lra_memory_ratio']:.2f}{mark}")
    if parts:
      out.append(f"{r['variant']} at {length_label(r['length'])}: " + ", ".join(parts))
  return out


def plot(table_rows: Sequence[dict[str, Any]], path: Path, memory_only: bool) -> None:
  """Steps/s and compiled memory against length (top row), and their ratios to flash and to dense softmax, log-log,
  one line per variant."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  panels = [[("memory_bytes", "compiled step memory (MiB)", 2**-20),
             ("memory_ratio", "memory / flash softmax", 1.0), ("memory_ratio_dense", "memory / dense softmax", 1.0)]]
  if not memory_only:
    panels.insert(0, [("steps_per_s", "training steps / s", 1.0), ("speedup", "speed-up over flash softmax", 1.0),
                      ("speedup_dense", "speed-up over dense softmax", 1.0)])
  fig, axes = plt.subplots(len(panels), 3, figsize=(19.5, 4.8 * len(panels)), squeeze=False)
  variants = list(dict.fromkeys(r["variant"] for r in table_rows))
  # tab10 repeats after 10 lines; the line style changes with each repeat so every variant stays distinguishable.
  colors, styles = plt.get_cmap("tab10").colors, ("-", "--", ":")
  for ax, (key, label, scale) in ((ax, p) for row_axes, row in zip(axes, panels) for ax, p in zip(row_axes, row)):
    for i, v in enumerate(variants):
      points = sorted((r["length"], r[key] * scale) for r in table_rows
                      if r["variant"] == v and r["status"] == "ok" and r[key])
      if points:
        ax.plot(*zip(*points), marker="o", label=v, linewidth=2.5 if v in BASELINES else 1.2,
                color=colors[i % len(colors)], linestyle=styles[(i // len(colors)) % len(styles)])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  if axes[0][0].lines:
    axes[0][0].legend(fontsize=8, loc="best")
  fig.suptitle("LRA Text encoder, one training step")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)



def layer_bytes(name: str, *, length: int, features: int = 256, num_heads: int = 4, batch: int = 1,
                **options: Any) -> int:
  """Compiled bytes (arguments + outputs + temporaries) of `jit(value_and_grad)` of one attention layer's
  `sum(layer(x) * ct)` w.r.t. its parameters and `x`, with a padding mask as in training. Compiles, never runs."""
  import attention  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  layer = attention.build(name, num_heads=num_heads, **options)
  x = jax.ShapeDtypeStruct((batch, length, features), jnp.float32)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
  params = jax.eval_shape(layer.init, jax.random.key(0), x)

  def loss(params, x, mask, ct):
    return jnp.sum(layer.apply(params, x, mask=mask) * ct)

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x, mask, x).compile()
  return int(memory_figures(compiled)["memory_bytes"])


# ----------------------------------------------------------------------------------------------------------------------


def _parse_lengths(values: Sequence[str]) -> list[int]:
  try:
    lengths = sorted({int(v) for v in values})
  except ValueError:
    raise ValueError(f"--lengths must be positive integers, got {','.join(values)!r}") from None
  if not lengths or lengths[0] < 1:
    raise ValueError(f"--lengths must be positive integers, got {','.join(values)!r}")
  return lengths


def _variants(requested: Sequence[str] | None) -> list[str]:
  import attention  # pylint: disable=import-outside-toplevel  # no backend is initialised by importing it
  valid = attention.names()
  if not requested:
    requested = list(valid)
  unknown = [v for v in requested if v not in valid and v != DENSE]
  if unknown:
    raise ValueError(f"unknown attention variant(s) {unknown} in --attention; valid choices: {', '.join(valid)}")
  return [BASELINE, DENSE] + [v for v in dict.fromkeys(requested) if v not in BASELINES]


def run(argv: Sequence[str]) -> str:
  """Measures every cell and writes the files; returns the markdown."""
  if not _OUTPUT_DIR.value:
    raise ValueError("--output_dir is required: the folder for benchmark.md, benchmark.csv and benchmark.png")
  for name, value, low in (("num_layers", _NUM_LAYERS.value, 1), ("batch_size", _BATCH_SIZE.value, 1),
                           ("steps", _STEPS.value, 1), ("warmup", _WARMUP.value, 0)):
    if value < low:
      raise ValueError(f"--{name}={value} must be at least {low}")
  if _TIMEOUT.value <= 0:
    raise ValueError(f"--timeout={_TIMEOUT.value} must be positive (seconds per cell)")
  lengths = _parse_lengths(_LENGTHS.value)
  variants = _variants(_ATTENTION.value)
  output_dir = Path(_OUTPUT_DIR.value).expanduser()
  log_dir = output_dir / "logs"
  log_dir.mkdir(parents=True, exist_ok=True)
  options = {"num_layers": _NUM_LAYERS.value, "batch_size": _BATCH_SIZE.value, "dtype": _DTYPE.value,
             "steps": _STEPS.value, "warmup": _WARMUP.value, "memory_only": _MEMORY_ONLY.value,
             "implementation": _IMPLEMENTATION.value, "attention_dropout_rate": _ATTENTION_DROPOUT.value}

  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  interactive = sys.stderr.isatty()
  bar = tqdm(total=len(variants) * len(lengths), unit="cell", disable=not interactive, dynamic_ncols=True)
  device: dict[str, Any] = {}
  cells: list[Cell] = []

  def on_cell(cell: Cell) -> None:
    bar.update(1)
    summary = cell.status if cell.status != "ok" else (
        f"{cell.figures.get('steps_per_s', math.nan):.3g} steps/s, " if not _MEMORY_ONLY.value else "") + \
        mib(cell.figures.get("memory_bytes"))
    if cell.status in ("error", "timeout", "oom", "skipped"):
      summary += f": {cell.error}"
    message = f"{cell.variant} @ {cell.length}: {summary}"
    if interactive:
      bar.set_postfix_str(f"{cell.variant} {length_label(cell.length)}")
      bar.write(message)
    else:
      print(message, file=sys.stderr, flush=True)

  def on_outcome(outcome: pool.Outcome) -> None:
    figures = {k: v for k, v in outcome.record.items() if k not in ("variant", "length", "status", "error")}
    cell = Cell(outcome.job, outcome.item, outcome.status, figures=figures, error=outcome.error)
    cells.append(cell)
    on_cell(cell)

  # One variant at a time (parallel=1): cells timed side by side must not share the machine.
  jobs = [pool.Job(variant, lengths, lambda chunk, variant=variant: _worker_command(variant, chunk, options),
                   process_per_item=_PROCESS_PER_CELL.value, label="length {}") for variant in variants]
  try:
    pool.run(jobs, log_dir=log_dir, timeout=_TIMEOUT.value, on_outcome=on_outcome, on_info=device.update, cwd=ROOT)
  finally:
    bar.close()

  table_rows = rows(cells)
  header = header_block(argv, device, {**options, "timeout": _TIMEOUT.value}) if _MARKDOWN_HEADER.value else None
  title = None
  if _MARKDOWN_HEADER.value:
    title = (f"LRA Text training step on {device.get('device_kind', 'an unknown device')} "
             f"({device.get('platform', '?')}), {_DTYPE.value}, {_NUM_LAYERS.value} layers, batch {_BATCH_SIZE.value}")
  text = markdown(table_rows, lengths, header, _MEMORY_ONLY.value, title)
  (output_dir / "benchmark.md").write_text(text)
  write_csv(table_rows, output_dir / "benchmark.csv")
  plot(table_rows, output_dir / "benchmark.png", _MEMORY_ONLY.value)
  (output_dir / "device.json").write_text(json.dumps(device, indent=2) + "\n")
  return text


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    run_worker(_WORKER.value, _parse_lengths(_LENGTHS.value), num_layers=_NUM_LAYERS.value,
               batch_size=_BATCH_SIZE.value, dtype=_DTYPE.value, steps=_STEPS.value, warmup=_WARMUP.value,
               memory_only=_MEMORY_ONLY.value, implementation=_IMPLEMENTATION.value,
               attention_dropout_rate=_ATTENTION_DROPOUT.value)
    return
  if _CORE.value:  # the core benchmark (scripts/benchmark_core.py)
    print(run_core(sys.argv, core=_CORE.value, lengths=_parse_lengths(_LENGTHS.value), output_dir=_OUTPUT_DIR.value,
                   batch=_CORE_BATCH.value, heads=_CORE_HEADS.value, head_dim=_CORE_HEAD_DIM.value, dtype=_DTYPE.value,
                   steps=_STEPS.value, warmup=_WARMUP.value, memory_only=_MEMORY_ONLY.value,
                   causal=_CORE_CAUSAL.value, dropout_rate=_CORE_DROPOUT.value, block_size=_CORE_BLOCK_SIZE.value,
                   band=_CORE_BAND.value, markdown_header=_MARKDOWN_HEADER.value))
    return
  if _SEQUENCE_PARALLEL.value > 1:  # context parallelism: its own table (scripts/benchmark_sequence.py)
    import benchmark_sequence  # pylint: disable=import-outside-toplevel
    requested = [v for v in _variants(_ATTENTION.value) if v in (_ATTENTION.value or [v])]  # no softmax column
    print(benchmark_sequence.run(
        requested, _parse_lengths(_LENGTHS.value), _SEQUENCE_PARALLEL.value,
        num_layers=_NUM_LAYERS.value, batch_size=_BATCH_SIZE.value, dtype=_DTYPE.value, steps=_STEPS.value,
        memory_only=_MEMORY_ONLY.value, output_dir=_OUTPUT_DIR.value or "runs/benchmark_sequence",
        baseline=_SEQUENCE_BASELINE.value, timeout=_TIMEOUT.value))
    return
  print(run(sys.argv))  # a bad flag value (ValueError) becomes cli.run's one `error:` line, exit status 2


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit status 2
