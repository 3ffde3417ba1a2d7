"""bfloat16 kernels against the float32 reference: the error a bf16 run of each attention kernel carries.

    python scripts/kernel_tolerance.py --lengths=4096,8192 --output=/tmp/tolerance.md          # on a GPU or TPU
    python scripts/kernel_tolerance.py --lengths=256 --implementation=interpret               # CPU smoke (slow)

For each case, q, k, v (and a random cotangent) are drawn in float32; the reference runs in float32 on them, the
kernel in bfloat16 on their bfloat16 rounding. Reported per tensor (output, dQ, dK, dV): the largest absolute error
divided by the largest reference magnitude (`max rel`), and the mean absolute error over the mean magnitude
(`mean rel`). Cases, batch 1, 4 heads, head dim 64, no dropout:
  block_sparse/bigbird  64-token blocks: 2 global blocks (rows and columns), a 3-block band, 3 random blocks per row;
  block_sparse/local    32-token blocks, a 3-block band (on GPU: 64-token tiles masking the 32-token blocks);
  linear/noncausal, linear/causal  normalized linear attention on elu+1 features, chunk 64.
`--implementation=pallas` (default) raises where the platform has no kernel for a case, rather than timing XLA.
The table goes to stdout and, with `--output`, to a markdown file (docs/precision.md records a GPU run).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from lra import cli  # noqa: E402  (after the path set-up)

_LENGTHS = flags.DEFINE_list("lengths", ["4096", "8192"], "Sequence lengths (tokens).")
_IMPLEMENTATION = flags.DEFINE_enum("implementation", "pallas", ["pallas", "interpret", "xla"],
                                    "Which bf16 implementation is checked against the float32 reference.")
_CASES = flags.DEFINE_list("cases", ["bigbird", "local", "linear_noncausal", "linear_causal"], "Cases to run.")
_OUTPUT = flags.DEFINE_string("output", None, "Markdown file for the table (optional).")

HEADS, HEAD_DIM = 4, 64


def _block_sparse(kind: str) -> tuple[Callable, Callable]:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from attention import sparse_layouts  # pylint: disable=import-outside-toplevel
  from kernels.block_sparse import block_sparse_attention  # pylint: disable=import-outside-toplevel
  block = 64 if kind == "bigbird" else 32

  def layout(length):
    n = length // block
    if kind == "bigbird":
      return sparse_layouts.bigbird_layout(n, num_heads=HEADS, seed=0)
    return sparse_layouts.local_layout(n, window=3)

  def run(implementation):
    return lambda q, k, v: block_sparse_attention(q, k, v, np.asarray(layout(q.shape[1])), block_size=block,
                                                  implementation=implementation)
  return run, layout


def _linear(causal: bool) -> Callable:
  import jax  # pylint: disable=import-outside-toplevel
  from kernels.linear_attention import linear_attention  # pylint: disable=import-outside-toplevel

  def run(implementation):
    def f(q, k, v):
      phi = lambda x: jax.nn.elu(x) + 1.0  # noqa: E731
      return linear_attention(phi(q), phi(k), v, causal=causal, implementation=implementation)
    return f
  return run


def measure(case: str, length: int, implementation: str) -> dict[str, float]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  if case in ("bigbird", "local"):
    run = _block_sparse(case)[0]
  else:
    run = _linear(causal=case == "linear_causal")
  keys = jax.random.split(jax.random.key(length), 4)
  q, k, v, ct = (jax.random.normal(key, (1, length, HEADS, HEAD_DIM), jnp.float32) for key in keys)

  def value_and_grads(fn):
    def f(q, k, v):
      out, vjp = jax.vjp(fn, q, k, v)
      return (out, *vjp(ct.astype(out.dtype)))
    return jax.jit(f)

  want = value_and_grads(run("reference"))(q, k, v)
  bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
  t0 = time.perf_counter()
  got = jax.block_until_ready(value_and_grads(run(implementation))(bf(q), bf(k), bf(v)))
  elapsed = time.perf_counter() - t0
  out: dict[str, float] = {"seconds": elapsed}
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    err = np.abs(g - w)
    out[f"{name}_max_rel"] = float(err.max() / max(np.abs(w).max(), 1e-30))
    out[f"{name}_mean_rel"] = float(err.mean() / max(np.abs(w).mean(), 1e-30))
  return out


def table(rows: Sequence[tuple[str, int, dict[str, float]]], header: str) -> str:
  lines = [header, "", "| case | length | out max / mean | dQ max / mean | dK max / mean | dV max / mean |",
           "|---|---:|---:|---:|---:|---:|"]
  for case, length, r in rows:
    if "error" in r:
      lines.append(f"| {case} | {length} | error: {r['error']} | | | |")
      continue
    cells = [f"{r[f'{t}_max_rel']:.2e} / {r[f'{t}_mean_rel']:.2e}" for t in ("out", "dq", "dk", "dv")]
    lines.append(f"| {case} | {length} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=import-outside-toplevel
  lengths = [int(x) for x in _LENGTHS.value]
  unknown = set(_CASES.value) - {"bigbird", "local", "linear_noncausal", "linear_causal"}
  if unknown:
    raise cli.UserError(f"unknown --cases {sorted(unknown)}; valid: bigbird, local, linear_noncausal, linear_causal")
  rows = []
  for case in _CASES.value:
    for length in lengths:
      try:
        rows.append((case, length, measure(case, length, _IMPLEMENTATION.value)))
      except Exception as e:  # pylint: disable=broad-except  # one failing case must not hide the others
        rows.append((case, length, {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}))
      print(table(rows[-1:], f"<!-- {case} {length} -->"), flush=True)
  device = jax.devices()[0]
  header = (f"bf16 `{_IMPLEMENTATION.value}` vs float32 reference on {device.device_kind} ({device.platform}), "
            f"jax {jax.__version__}; batch 1, {HEADS} heads, head dim {HEAD_DIM}; error relative to the reference's "
            f"largest (max) and mean (mean) magnitude")
  text = table(rows, header)
  print(text)
  if _OUTPUT.value:
    Path(_OUTPUT.value).write_text(text)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit status 2
