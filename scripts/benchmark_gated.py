r"""Gated / delta-rule cores (issue 35): forward + backward time against flash softmax's causal core and plain
`linear`'s chunked core, compiled memory against length, and float32 error against a float64 recurrence.

  python scripts/benchmark_gated.py                      # the issue's figures: 16K time, 8K/16K/32K memory, 4K error
  python scripts/benchmark_gated.py --time_length=2048 --memory_lengths=1024,2048 --error_length=512   # quick

Shape: causal, batch 2, 4 heads, head dim 64 (key and value), float32, XLA forms (`implementation="xla"`: what runs
on CPU). Cores: `gated_linear` with a decay per head (RetNet / Mamba-2), per key dimension (GLA; its default 16-token
chunks), the delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet); baselines `softmax` (flash, causal) and
`linear` (chunked, causal). Time: the median of `--repeats` runs of a jitted value_and_grad after one warm-up run.
Memory: XLA's compiled plan of the same function (temporaries + arguments + outputs; nothing runs). Error: the XLA
form in float32 against the token recurrence in float64 (jax x64), max |difference| / max |reference|, output and
the gradients of q, k, v (and of the gates). Prints a markdown table; `--json` writes the records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels.delta_rule import delta_rule_attention  # noqa: E402
from kernels.gated_linear import gated_linear_attention  # noqa: E402
from kernels.linear_attention import linear_attention  # noqa: E402
from kernels.softmax import softmax_attention  # noqa: E402
from scripts.memory_analysis import compiled_memory  # noqa: E402

B, H, D = 2, 4, 64


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def cores():
  """name -> (f(q, k, v, g, beta) -> out, uses the gate g of shape "head" | "key" | None, uses beta)."""
  return {
      "softmax (flash, causal)": (lambda q, k, v, g, b: softmax_attention(q, k, v, causal=True), None, False),
      "linear (chunked, causal)": (lambda q, k, v, g, b: linear_attention(
          jax.nn.elu(q) + 1, jax.nn.elu(k) + 1, v, causal=True, implementation="xla"), None, False),
      "gated_linear per head (retnet, mamba2)": (lambda q, k, v, g, b: gated_linear_attention(
          q, k, v, g, implementation="xla"), "head", False),
      "gated_linear per key (gla, chunk 16)": (lambda q, k, v, g, b: gated_linear_attention(
          q, k, v, g, chunk_size=16, implementation="xla"), "key", False),
      "delta_rule (deltanet)": (lambda q, k, v, g, b: delta_rule_attention(
          _unit(q), _unit(k), v, b, implementation="xla"), None, True),
      "delta_rule gated (gated_deltanet)": (lambda q, k, v, g, b: delta_rule_attention(
          _unit(q), _unit(k), v, b, g, implementation="xla"), "head", True),
  }


def _inputs(length: int, gate: str | None, seed: int = 0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (jax.random.normal(x, (B, length, H, D), dtype) for x in ks[:3])
  shape = (B, length, H, D) if gate == "key" else (B, length, H)
  g = -0.05 * jax.nn.softplus(jax.random.normal(ks[3], shape, dtype))  # long memories
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, length, H), dtype))
  return q, k, v, g, beta


def _step(f):
  return jax.value_and_grad(lambda q, k, v, g, b: jnp.sum(f(q, k, v, g, b)), argnums=(0, 1, 2, 3, 4))


def time_core(f, gate, length: int, repeats: int) -> float:
  args = _inputs(length, gate)
  step = jax.jit(_step(f))
  jax.block_until_ready(step(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def memory_core(f, gate, length: int) -> int:
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in jax.eval_shape(lambda: _inputs(length, gate))]
  return compiled_memory(_step(f), *shapes)["total"]


def error_core(name: str, length: int) -> float:
  """float32 XLA form against the float64 recurrence: the largest relative error over the output and gradients."""
  from kernels.delta_rule import delta_rule_reference  # pylint: disable=import-outside-toplevel
  from kernels.gated_linear import gated_linear_reference  # pylint: disable=import-outside-toplevel
  gate = {"gated_linear per head (retnet, mamba2)": "head", "gated_linear per key (gla, chunk 16)": "key",
          "delta_rule (deltanet)": None, "delta_rule gated (gated_deltanet)": "head"}[name]
  q, k, v, g, beta = _inputs(length, gate, seed=1)
  if name.startswith("delta"):
    q, k = _unit(q), _unit(k)
    g = g if gate else None
    fast = lambda q, k, v, g, b: delta_rule_attention(q, k, v, b, g, implementation="xla")  # noqa: E731
    slow = lambda q, k, v, g, b: delta_rule_reference(q, k, v, b, g)[0]  # noqa: E731
  else:
    fast = lambda q, k, v, g, b: gated_linear_attention(q, k, v, g, chunk_size=16 if gate == "key" else 64,  # noqa: E731
                                                        implementation="xla")
    slow = lambda q, k, v, g, b: gated_linear_reference(q, k, v, g)[0]  # noqa: E731
  ct = jax.random.normal(jax.random.key(5), v.shape)
  argnums = (0, 1, 2) + ((3,) if g is not None else ())

  def grads(f, *args):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * a[-1]), argnums=argnums))(*args)

  def outputs(f, *args):
    return jax.jit(lambda *a: f(*a[:-1]))(*args)

  got = [outputs(fast, q, k, v, g, beta, ct), *grads(lambda *a: fast(*a[:-1]), q, k, v, g, beta, ct)[1]]
  with jax.enable_x64(True):
    args64 = [None if x is None else np.asarray(x, np.float64) for x in (q, k, v, g, beta, ct)]
    want = [outputs(slow, *args64), *grads(lambda *a: slow(*a[:-1]), *args64)[1]]
    want = [np.asarray(w) for w in want]
  return max(float(np.abs(np.asarray(a, np.float64) - w).max() / np.abs(w).max()) for a, w in zip(got, want))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--time_length", type=int, default=16384)
  parser.add_argument("--memory_lengths", default="8192,16384,32768")
  parser.add_argument("--error_length", type=int, default=4096)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--only", default="", help="comma-separated substrings of core names to run")
  parser.add_argument("--skip", default="", help="comma-separated: time,memory,error")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  skip = set(filter(None, args.skip.split(",")))
  lengths = [int(x) for x in args.memory_lengths.split(",") if x]
  records = []
  for name, (f, gate, _) in cores().items():
    if args.only and not any(s in name for s in args.only.split(",")):
      continue
    rec = {"core": name}
    if "memory" not in skip:
      rec["memory_bytes"] = {n: memory_core(f, gate, n) for n in lengths}
    if "time" not in skip:
      rec["seconds"] = time_core(f, gate, args.time_length, args.repeats)
    if "error" not in skip and name.startswith(("gated", "delta")):
      rec["rel_error_f32_vs_f64"] = error_core(name, args.error_length)
    records.append(rec)
    print(json.dumps(rec), flush=True)
  base = {r["core"].split(" ")[0]: r.get("seconds") for r in records}
  print(f"\n| core | fwd+bwd s at {args.time_length} | vs softmax | vs linear | "
        + " | ".join(f"memory {n} MiB" for n in lengths) + " | max ratio per doubling | f32 vs f64 at "
        f"{args.error_length} |")
  print("|---" * (6 + len(lengths)) + "|")
  for r in records:
    s = r.get("seconds")
    ratio = lambda ref: f"{s / ref:.2f}x" if s and ref else "-"  # noqa: E731
    mem = r.get("memory_bytes", {})
    doubling = [mem[b] / mem[a] for a, b in zip(lengths, lengths[1:]) if a in mem and b in mem]
    err = r.get("rel_error_f32_vs_f64")
    print(f"| {r['core']} | {s:.2f} | {ratio(base.get('softmax'))} | {ratio(base.get('linear'))} | " if s else
          f"| {r['core']} | - | - | - | ", end="")
    print(" | ".join(f"{mem[n] / 2**20:,.0f}" if n in mem else "-" for n in lengths)
          + f" | {max(doubling):.2f} |" if doubling else " | - |", end="")
    print(f" {err:.1e} |" if err is not None else " - |")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(records, fh, indent=1)


if __name__ == "__main__":
  main()
