r"""The core benchmark: one functional core of `kernels/`, forward + backward, beside flash and dense softmax, in one
process. Users run it through `scripts/benchmark.py --core=...` (the one benchmark command; its flags are unchanged):

  python scripts/benchmark.py --core=softmax --lengths=8192 --core_dropout=0.1 --output_dir=runs/core
  python scripts/benchmark.py --core=block_sparse --memory_only --lengths=2048,8192 --output_dir=runs/core_bs
  python scripts/benchmark.py --core=flex --lengths=8192,16384 --core_dropout=0.1 --output_dir=runs/core_flex

`jit(value_and_grad)` of `sum(core(q, k, v) * ct)` w.r.t. q, k, v: time per call and XLA's compiled memory, with
ratios to both softmax baselines (`core.md`, `core.csv`). A new core is one branch of `core_functions` and its name in
`CORES`. This module also holds the figure helpers both tables use (compiled-memory figures, ratios, the header
block, CSV); scripts/benchmark.py (the training-step table and the command line) imports them from here, never the
other way round.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # importable from anywhere
  sys.path.insert(0, str(ROOT))

from lra import tables  # noqa: E402  (after the path set-up)

BASELINE = "softmax"  # flash softmax: the default implementation
DENSE = "softmax-dense"  # softmax with implementation="reference": the dense form (LRA's Transformer)
BASELINES = (BASELINE, DENSE)
CORES = ("softmax", "block_sparse", "linear", "flex")

# ----------------------------------------------------------------------------------------------------------------------
# Figures both tables use.


def memory_figures(compiled: Any) -> dict[str, int | None]:
  """XLA's planned bytes for one step; `memory` = arguments + outputs + temporaries - aliased (donated)."""
  analysis = compiled.memory_analysis()
  if analysis is None:  # some backends do not report it
    return {"memory_bytes": None}
  out = {f"{k}_bytes": int(getattr(analysis, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "temp", "alias")}
  out["memory_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  return out


def error_line(e: BaseException) -> str:
  lines = [line for line in f"{type(e).__name__}: {e}".splitlines() if line.strip()]
  return lines[0] if lines else type(e).__name__


def jaxlib_version() -> str | None:
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return None


def ratio(value: float | None, base: float | None) -> float | None:
  if value is None or base is None or not base:
    return None
  return value / base


def length_label(length: int) -> str:
  return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def mib(n: float | None) -> str:
  return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def header_block(argv: Sequence[str], device: dict[str, Any], options: dict[str, Any]) -> str:
  """Command, date, machine, device and versions: what a reader needs to redo the table."""
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  command = "python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in argv[1:])
  machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}"
  processor = platform.processor()
  if processor and processor != platform.machine():
    machine = f"{processor}, " + machine
  dev = (f"{device.get('num_devices', '?')} x {device.get('device_kind', '?')} ({device.get('platform', '?')}); "
         f"measured on the first" if device else "unknown (no worker reported)")
  settings = ", ".join(f"{k}={v}" for k, v in options.items())
  return "\n".join([
      f"- command: `{command}`",
      f"- date: {date}",
      f"- machine: {machine}; Python {platform.python_version()}",
      f"- device: {dev}",
      f"- jax {device.get('jax_version', '?')}, jaxlib {device.get('jaxlib_version', '?')}",
      f"- settings: {settings}",
  ])


def write_csv(table_rows: Sequence[dict[str, Any]], path: Path) -> None:
  Path(path).write_text(tables.csv_text(table_rows))



# ----------------------------------------------------------------------------------------------------------------------
# --core: one functional core, forward + backward, beside flash and dense softmax, in this process.


def core_functions(core: str, *, causal: bool, dropout_rate: float, block_size: int = 64,
                   band: int = 3) -> dict[str, Any]:
  """`{label: fn(q, k, v, rng) -> out}`: the two softmax baselines (flash = the default implementation, dense =
  "reference"), then `core`'s default and reference implementations (for `core="softmax"` the baselines are all)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from kernels.linear_attention import linear_attention
  from kernels.softmax import softmax_attention

  def softmax(implementation):
    return lambda q, k, v, rng: softmax_attention(q, k, v, causal=causal, implementation=implementation,
                                                  dropout_rate=dropout_rate, dropout_rng=rng)

  def block_sparse(implementation):
    from attention.sparse_layouts import local_layout
    from kernels.block_sparse import block_sparse_attention

    def fn(q, k, v, rng):
      layout = local_layout(q.shape[1] // block_size, window=band)
      return block_sparse_attention(q, k, v, layout, block_size=block_size, causal=causal,
                                    implementation=implementation, dropout_rate=dropout_rate, dropout_rng=rng)
    return fn

  def linear(implementation):
    phi = lambda x: jax.nn.elu(x) + 1.0  # noqa: E731  (non-negative features: normalized linear attention)
    return lambda q, k, v, rng: linear_attention(phi(q), phi(k), v, causal=causal, implementation=implementation)

  out = {BASELINE: softmax(None), DENSE: softmax("reference")}
  if core == "flex":  # no dense baseline: [B, H, L, L] scores at 16K do not fit this machine
    from kernels.flex import flex_attention

    def flex(name):
      return lambda q, k, v, rng: flex_attention(q, k, v, mask_mod=flex_masks(q.shape[1])[name],
                                                 dropout_rate=dropout_rate, dropout_rng=rng)
    causal_softmax = lambda q, k, v, rng: softmax_attention(q, k, v, causal=True, dropout_rate=dropout_rate,  # noqa
                                                            dropout_rng=rng)
    out = {BASELINE: softmax(None), "softmax-causal": causal_softmax}
    out.update({f"flex-{name}": flex(name) for name in FLEX_MASK_NAMES})
  elif core == "block_sparse":
    out.update({"block_sparse": block_sparse(None), "block_sparse-reference": block_sparse("reference")})
  elif core == "linear":
    out.update({"linear": linear(None), "linear-reference": linear("reference")})
  elif core != "softmax":
    raise ValueError(f"--core={core!r}: valid choices are {', '.join(CORES)}")
  return out


FLEX_MASK_NAMES = ("causal", "sliding_window", "dilated", "longformer", "bigbird", "sparse_transformer")


@functools.lru_cache(maxsize=None)
def flex_masks(length: int) -> dict[str, Any]:
  """`--core=flex`'s mask functions at `length` tokens (token level, 128-token blocks where a pattern has blocks;
  one function object per length, so the block masks are built once). bigbird's random blocks (3 per query block)
  come from a fixed numpy seed, as a table indexed by block."""
  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp
  import numpy as np
  blk, window = 128, 512
  nb = -(-length // blk)
  rand = np.random.default_rng(0).integers(0, nb, (nb, 3))  # the random key blocks of each query block

  def bigbird(b, h, i, j):
    bi, bj = i // blk, j // blk
    r = jnp.asarray(rand)[bi]
    rnd = (r[..., 0] == bj) | (r[..., 1] == bj) | (r[..., 2] == bj)
    return (jnp.abs(bi - bj) <= 1) | (bi == 0) | (bj == 0) | rnd

  return {
      "causal": lambda b, h, i, j: j <= i,
      "sliding_window": lambda b, h, i, j: jnp.abs(i - j) < window,
      "dilated": lambda b, h, i, j: (jnp.abs(i - j) < 4 * window) & ((i - j) % 4 == 0),
      "longformer": lambda b, h, i, j: (jnp.abs(i - j) < window) | (i < blk) | (j < blk),
      "bigbird": bigbird,
      "sparse_transformer": lambda b, h, i, j: (jnp.abs(i - j) < 2 * blk) | (j % (2 * blk) >= 2 * blk - 8),
  }




def flex_visited(label: str, length: int) -> float | None:
  """Fraction of 128x128 tiles the `--core=flex` mask `label` ("flex-<mask>") visits at `length` tokens."""
  from kernels.flex import create_block_mask  # pylint: disable=import-outside-toplevel
  if not label.startswith("flex-"):
    return None
  return create_block_mask(flex_masks(length)[label[5:]], 1, 1, length, length, 128).visited_fraction()


def measure_core(fn, *, length: int, batch: int, heads: int, head_dim: int, dtype: str, steps: int, warmup: int,
                 memory_only: bool) -> dict[str, Any]:
  """Compiled memory (and unless `memory_only`, ms per call) of `jit(value_and_grad)` of `sum(fn(q, k, v) * ct)`
  w.r.t. q, k, v. The dropout key is an argument, so XLA cannot fold the mask into a constant."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp

  def loss(q, k, v, ct, rng):
    return jnp.sum(fn(q, k, v, rng).astype(jnp.float32) * ct)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  keys = jax.random.split(jax.random.key(length), 4)
  q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.dtype(dtype)) for key in keys[:3])
  ct = jax.random.normal(keys[3], q.shape, jnp.float32)
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = grad.lower(q, k, v, ct, rng).compile()
  out: dict[str, Any] = {"compile_s": time.perf_counter() - t0, **memory_figures(compiled)}
  if memory_only:
    return out
  result = None
  for _ in range(warmup):
    result = compiled(q, k, v, ct, rng)
  jax.block_until_ready(result)
  t0 = time.perf_counter()
  for _ in range(steps):
    result = compiled(q, k, v, ct, rng)
  jax.block_until_ready(result)
  out["call_ms"] = 1e3 * (time.perf_counter() - t0) / steps
  return out


def core_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Ratios of every record to flash softmax and to dense softmax at its length: speed-up (time ratio, > 1 is
  faster) and memory ratio."""
  by = {(r["implementation"], r["length"]): r for r in records}
  out = []
  for r in records:
    row = dict(r)
    for suffix, base_name in (("", BASELINE), ("_dense", DENSE)):
      base = by.get((base_name, r["length"]), {})
      row[f"speedup{suffix}"] = ratio(base.get("call_ms"), r.get("call_ms"))
      row[f"memory_ratio{suffix}"] = ratio(r.get("memory_bytes"), base.get("memory_bytes"))
    if r.get("visited") is not None:  # flex: time over (fraction of tiles visited x flash softmax's time)
      flash = by.get((BASELINE, r["length"]), {}).get("call_ms")
      row["tile_ratio"] = ratio(r.get("call_ms"), None if flash is None else r["visited"] * flash)
    out.append(row)
  return out


def core_markdown(table_rows: Sequence[dict[str, Any]], title: str, header: str | None) -> str:
  fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
  lines = [f"## {title}", ""] + ([header, ""] if header else [])
  columns = ["implementation", "length", "fwd+bwd ms", "compiled memory", "speed-up over flash softmax",
             "over dense softmax", "memory / flash softmax", "memory / dense softmax"]
  cells = []
  for r in table_rows:
    if r.get("status", "ok") != "ok":
      cells.append({"implementation": r["implementation"], "length": length_label(r["length"]),
                    "fwd+bwd ms": f"{r['status']}: {r.get('error', '')}", **dict.fromkeys(columns[3:], "-")})
      continue
    cells.append({"implementation": r["implementation"], "length": length_label(r["length"]),
                  "fwd+bwd ms": fmt(r.get("call_ms"), "{:,.1f}"), "compiled memory": mib(r["memory_bytes"]),
                  "speed-up over flash softmax": fmt(r["speedup"], "{:.2f}×"),
                  "over dense softmax": fmt(r["speedup_dense"], "{:.2f}×"),
                  "memory / flash softmax": fmt(r["memory_ratio"], "{:.3f}"),
                  "memory / dense softmax": fmt(r["memory_ratio_dense"], "{:.3f}")})
  lines.append(tables.markdown(cells, columns, align=dict.fromkeys(columns[1:], "right")))
  flex = [r for r in table_rows if r.get("visited") is not None]
  if flex:
    lines += ["", "| mask | length | tiles visited | fwd+bwd ms | time / (visited x flash softmax time) |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['implementation'][5:]} | {length_label(r['length'])} | {r['visited']:.3f} | "
              f"{fmt(r.get('call_ms'), '{:,.1f}')} | {fmt(r.get('tile_ratio'), '{:.2f}')} |" for r in flex]
  lines += ["", "Compiled memory: XLA's plan for `jit(value_and_grad)` of the core (arguments + outputs + temporaries "
            "- aliases). softmax is flash attention (the default implementation); softmax-dense is implementation="
            "\"reference\"; `<core>-reference` is that core's dense ground truth.", ""]
  return "\n".join(lines)


def run_core(argv: Sequence[str], *, core: str, lengths: Sequence[int], output_dir: str | None, batch: int = 2,
             heads: int = 4, head_dim: int = 64, dtype: str = "float32", steps: int = 10, warmup: int = 2,
             memory_only: bool = False, causal: bool = False, dropout_rate: float = 0.0, block_size: int = 64,
             band: int = 3, markdown_header: bool = True) -> str:
  """Every implementation of `core_functions` at every length, side by side; writes core.md and core.csv into
  `output_dir` and returns the markdown. `argv` is the command line the header records. Bad values raise one-line
  ValueErrors naming the flag of `scripts/benchmark.py` that sets them."""
  if not output_dir:
    raise ValueError("--output_dir is required: the folder for core.md and core.csv")
  for name, value, low in (("core_batch", batch, 1), ("core_heads", heads, 1), ("core_head_dim", head_dim, 1),
                           ("steps", steps, 1), ("warmup", warmup, 0), ("core_block_size", block_size, 1),
                           ("core_band", band, 1)):
    if value < low:
      raise ValueError(f"--{name}={value} must be at least {low}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"--core_dropout={dropout_rate} must be in [0, 1)")
  if core == "block_sparse" and any(n % block_size for n in lengths):
    raise ValueError(f"--lengths={','.join(map(str, lengths))} must be multiples of "
                     f"--core_block_size={block_size} for --core=block_sparse")
  import jax  # pylint: disable=import-outside-toplevel
  functions = core_functions(core, causal=causal, dropout_rate=dropout_rate, block_size=block_size, band=band)
  dims = dict(batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, steps=steps, warmup=warmup,
              memory_only=memory_only)
  records = []
  for length in lengths:
    for label, fn in functions.items():
      record: dict[str, Any] = {"implementation": label, "length": length}
      try:
        record.update(status="ok", **measure_core(fn, length=length, **dims))
        if label.startswith("flex-"):
          t0 = time.perf_counter()
          record["visited"] = flex_visited(label, length)
          record["tables_s"] = time.perf_counter() - t0
      except Exception as e:  # pylint: disable=broad-except  # one failing cell must not end the table
        record.update(status="error", error=error_line(e))
      print(f"{label} @ {length}: {record.get('call_ms', '-')} ms, {mib(record.get('memory_bytes'))}",
            file=sys.stderr, flush=True)
      records.append(record)
  table_rows = core_rows(records)
  device = jax.devices()[0]
  title = (f"{core} core, forward + backward, on {device.device_kind} ({device.platform}), {dtype}, "
           f"batch {batch}, {heads} heads, head dim {head_dim}, "
           f"{'causal' if causal else 'non-causal'}, attention dropout {dropout_rate:g}")
  header = None
  if markdown_header:
    header = header_block(argv, {"platform": device.platform, "device_kind": device.device_kind,
                                 "num_devices": jax.device_count(), "jax_version": jax.__version__,
                                 "jaxlib_version": jaxlib_version()}, {**dims, "core": core})
  text = core_markdown(table_rows, title, header)
  out = Path(output_dir).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  (out / "core.md").write_text(text)
  write_csv(table_rows, out / "core.csv")
  return text
