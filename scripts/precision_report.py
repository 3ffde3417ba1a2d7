r"""bfloat16 against float32, per attention kernel: the error a bfloat16 forward+backward carries. Both tables of
docs/precision.md come from this script, one per `--baseline`:

  # float32 (default): the same implementation on float32 inputs and on their bfloat16 rounding (CPU, XLA forms;
  # linear attention 8K, block-sparse 4K, softmax 2K). docs/precision.md, "Measured tolerance".
  python scripts/precision_report.py
  python scripts/precision_report.py --interpret          # also the TPU Pallas linear-attention kernel, interpret mode

  # reference: the float32 *reference* (dense scores) against the kernel in bfloat16, per case and length (GPU/TPU).
  # docs/precision.md, "Mosaic GPU kernels on an H100" (phase 1 of scripts/gpu_report.sh).
  python scripts/precision_report.py --baseline=reference --lengths=4096,8192 --output=/tmp/tolerance.md
  python scripts/precision_report.py --baseline=reference --lengths=256 --implementation=interpret   # CPU smoke

q, k, v and a random cotangent are drawn in float32; the bfloat16 run takes their bfloat16 rounding. Reported per
tensor (output, dQ, dK, dV): the largest absolute error over the largest baseline magnitude (`max`), with the RMS
error over the baseline RMS (`--baseline=float32`) or the mean absolute error over the mean magnitude
(`--baseline=reference`). Batch 1, head dim 64, no dropout.

`--baseline=float32` cases (2 heads; linear attention's q and k feature-mapped with elu+1 before rounding):
  linear attention xla causal and non-causal at 8K; with --interpret the TPU Pallas kernel causal at 1K, chunk 128;
  block-sparse xla at 4K on a BigBird-like layout (64-token blocks: a 3-block window, 2 global, 2 random per row);
  softmax xla (`jax.nn.dot_product_attention`) causal at 2K.
`--baseline=reference` cases (`--cases`, 4 heads, at every `--lengths`):
  bigbird  block-sparse, 64-token blocks, `sparse_layouts.bigbird_layout` (2 global, a 3-block band, 3 random);
  local    block-sparse, 32-token blocks, a 3-block band (on GPU: 64-token tiles masking the 32-token blocks);
  linear_noncausal, linear_causal  normalized linear attention on elu+1 features (applied inside), chunk 64.
  `--implementation=pallas` (default) raises where the platform has no kernel for a case rather than timing XLA; one
  failing case is reported in its row and does not hide the others.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import jax  # noqa: E402  (after the path set-up)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attention import sparse_layouts  # noqa: E402
from kernels import block_sparse_attention, linear_attention  # noqa: E402
from kernels.softmax import softmax_attention  # noqa: E402
from lra import cli  # noqa: E402

BASELINES = ("float32", "reference")
REFERENCE_CASES = ("bigbird", "local", "linear_noncausal", "linear_causal")
HEAD_DIM = 64
TENSORS = ("out", "dq", "dk", "dv")

_BASELINE = flags.DEFINE_enum("baseline", "float32", BASELINES,
                              "float32: the same implementation on float32 inputs; reference: the float32 reference.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "--baseline=float32: also the TPU Pallas kernel in interpret mode.")
_LENGTHS = flags.DEFINE_list("lengths", ["4096", "8192"], "--baseline=reference: sequence lengths (tokens).")
cli.check_flag(_LENGTHS, cli.positive_ints, "comma-separated positive integers")
_IMPLEMENTATION = flags.DEFINE_enum("implementation", "pallas", ["pallas", "interpret", "xla"],
                                    "--baseline=reference: the bfloat16 implementation checked against the reference.")
_CASES = flags.DEFINE_list("cases", list(REFERENCE_CASES), "--baseline=reference: cases to run.")
_OUTPUT = flags.DEFINE_string("output", None, "Markdown file for the table (optional).")

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def draw(length: int, heads: int, seed: int) -> tuple[jax.Array, ...]:
  """q, k, v and a cotangent `[1, length, heads, HEAD_DIM]`, standard normal float32."""
  keys = jax.random.split(jax.random.key(seed), 4)
  return tuple(jax.random.normal(key, (1, length, heads, HEAD_DIM), jnp.float32) for key in keys)


def value_and_grads(fn: Attend, ct: jax.Array) -> Callable[..., tuple[jax.Array, ...]]:
  """Jitted `(q, k, v) -> (out, dq, dk, dv)` for the cotangent `ct` (cast to the output's dtype)."""

  def f(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(ct.astype(out.dtype)))

  return jax.jit(f)


def errors(got: Sequence[jax.Array], want: Sequence[jax.Array]) -> dict[str, float]:
  """`<tensor>_max_rel`, `<tensor>_rms_rel` and `<tensor>_mean_rel` of each of out, dq, dk, dv."""
  out = {}
  for name, g, w in zip(TENSORS, got, want):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    err = np.abs(g - w)
    out[f"{name}_max_rel"] = float(err.max() / max(np.abs(w).max(), 1e-30))
    out[f"{name}_rms_rel"] = float(np.sqrt((err ** 2).mean() / max((w ** 2).mean(), 1e-60)))
    out[f"{name}_mean_rel"] = float(err.mean() / max(np.abs(w).mean(), 1e-30))
  return out


def measure(fn: Attend, q, k, v, ct, baseline: Attend | None = None) -> dict[str, float]:
  """Errors of `fn` on the bfloat16 rounding of q, k, v against `baseline` (default: `fn` itself) on float32 q, k, v;
  `seconds` is the bfloat16 call's time (compilation included)."""
  want = value_and_grads(fn if baseline is None else baseline, ct)(q, k, v)
  start = time.perf_counter()
  got = jax.block_until_ready(value_and_grads(fn, ct)(*(x.astype(jnp.bfloat16) for x in (q, k, v))))
  return {"seconds": time.perf_counter() - start, **errors(got, want)}


def _elu1(x: jax.Array) -> jax.Array:
  return jax.nn.elu(x) + 1.0


# ----------------------------------------------------------------------------------------------------------------------
# --baseline=float32: the same implementation in both dtypes.


def float32_cases(interpret: bool) -> Iterator[tuple[str, tuple[jax.Array, ...], Attend]]:
  """(row name, (q, k, v, ct), attend) of the float32-baseline table."""
  block = 64
  n = 4096 // block
  rng = np.random.default_rng(0)
  layout = np.zeros((1, n, n), bool)  # BigBird-like: a 3-block window, 2 global blocks, 2 random blocks per row
  for i in range(n):
    layout[0, i, max(0, i - 1):i + 2] = True
    layout[0, i, rng.choice(n, 2, replace=False)] = True
  layout[0, :2, :] = layout[0, :, :2] = True

  def positive(length):  # feature-mapped inputs of linear attention
    q, k, v, ct = draw(length, 2, 0)
    return _elu1(q), _elu1(k), v, ct

  yield ("linear_attention xla, causal, 8K", positive(8192),
         lambda q, k, v: linear_attention(q, k, v, causal=True, implementation="xla"))
  yield ("linear_attention xla, non-causal, 8K", positive(8192),
         lambda q, k, v: linear_attention(q, k, v, causal=False, implementation="xla"))
  if interpret:
    yield ("linear_attention pallas (TPU, interpret), causal, 1K", positive(1024),
           lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=128, implementation="interpret"))
  yield ("block_sparse xla, BigBird-like layout, 4K", draw(4096, 2, 0),
         lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=block, implementation="xla"))
  yield ("softmax xla (jax.nn.dot_product_attention), causal, 2K", draw(2048, 2, 0),
         lambda q, k, v: softmax_attention(q, k, v, causal=True, implementation="xla"))


def float32_table(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
  lines = [f"backend={jax.default_backend()} jax={jax.__version__}; batch 1, 2 heads, head dim {HEAD_DIM}; each cell: "
           "max |err| / max |f32|, rms err / rms f32", "| kernel | out | dq | dk | dv |", "|---|---:|---:|---:|---:|"]
  for name, r in rows:
    lines.append(f"| {name} | " + " | ".join(f"{r[f'{t}_max_rel']:.1e}, {r[f'{t}_rms_rel']:.1e}" for t in TENSORS)
                 + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# --baseline=reference: the kernel in bfloat16 against the float32 reference.

REFERENCE_HEADS = 4


def reference_case(case: str) -> Callable[[str], Attend]:
  """`implementation -> attend` of a `--baseline=reference` case."""
  if case in ("bigbird", "local"):
    block = 64 if case == "bigbird" else 32

    def layout(length):
      n = length // block
      if case == "bigbird":
        return sparse_layouts.bigbird_layout(n, num_heads=REFERENCE_HEADS, seed=0)
      return sparse_layouts.local_layout(n, window=3)

    return lambda implementation: lambda q, k, v: block_sparse_attention(
        q, k, v, np.asarray(layout(q.shape[1])), block_size=block, implementation=implementation)
  if case in ("linear_noncausal", "linear_causal"):
    causal = case == "linear_causal"
    return lambda implementation: lambda q, k, v: linear_attention(_elu1(q), _elu1(k), v, causal=causal,
                                                                   implementation=implementation)
  raise ValueError(f"unknown case {case!r}; valid choices: {', '.join(REFERENCE_CASES)}")


def measure_case(case: str, length: int, implementation: str) -> dict[str, float]:
  """Errors of `case` at `length` in bfloat16 through `implementation` against its float32 reference."""
  attend = reference_case(case)
  q, k, v, ct = draw(length, REFERENCE_HEADS, length)
  return measure(attend(implementation), q, k, v, ct, baseline=attend("reference"))


def table(rows: Sequence[tuple[str, int, dict[str, float]]], header: str) -> str:
  """The `--baseline=reference` table; a row holding `error` says so in place of its figures."""
  lines = [header, "", "| case | length | out max / mean | dQ max / mean | dK max / mean | dV max / mean |",
           "|---|---:|---:|---:|---:|---:|"]
  for case, length, r in rows:
    if "error" in r:
      lines.append(f"| {case} | {length} | error: {r['error']} | | | |")
      continue
    cells = [f"{r[f'{t}_max_rel']:.2e} / {r[f'{t}_mean_rel']:.2e}" for t in TENSORS]
    lines.append(f"| {case} | {length} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def reference_report(cases: Sequence[str], lengths: Sequence[int], implementation: str) -> str:
  rows = []
  for case in cases:
    for length in lengths:
      try:
        rows.append((case, length, measure_case(case, length, implementation)))
      except Exception as e:  # pylint: disable=broad-except  # one failing case must not hide the others
        rows.append((case, length, {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}))
      print(table(rows[-1:], f"<!-- {case} {length} -->"), flush=True)
  device = jax.devices()[0]
  header = (f"bf16 `{implementation}` vs float32 reference on {device.device_kind} ({device.platform}), "
            f"jax {jax.__version__}; batch 1, {REFERENCE_HEADS} heads, head dim {HEAD_DIM}; error relative to the "
            f"reference's largest (max) and mean (mean) magnitude")
  return table(rows, header)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  if _BASELINE.value == "float32":
    rows = []
    for name, (q, k, v, ct), fn in float32_cases(_INTERPRET.value):
      rows.append((name, measure(fn, q, k, v, ct)))
      print(float32_table(rows[-1:]).splitlines()[-1], flush=True)
    text = float32_table(rows)
  else:
    unknown = sorted(set(_CASES.value) - set(REFERENCE_CASES))
    if unknown:
      raise cli.UserError(f"unknown --cases {unknown}; valid: {', '.join(REFERENCE_CASES)}")
    try:
      lengths = [int(x) for x in _LENGTHS.value]
    except ValueError:
      raise cli.UserError(f"--lengths={','.join(_LENGTHS.value)}: expected comma-separated integers") from None
    text = reference_report(_CASES.value, lengths, _IMPLEMENTATION.value)
  print(text)
  if _OUTPUT.value:
    Path(_OUTPUT.value).write_text(text)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit status 2
