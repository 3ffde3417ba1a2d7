"""scripts/precision_report.py (bf16 against float32: `--baseline=reference`, the kernel tolerance table, and
`--baseline=float32`) and benchmark.py's --implementation option, in process on CPU at tiny lengths."""

import jax
import numpy as np
import pytest

from kernels import linear_attention
from kernels.platform import KernelUnavailableError
from tests.conftest import load_script

precision_report = load_script("precision_report")
benchmark = load_script("benchmark", "benchmark")


@pytest.mark.parametrize("case", ["bigbird", "local", "linear_causal"])
def test_bf16_xla_errors_against_the_reference_are_bfloat16_sized_and_reported(case):
  r = precision_report.measure_case(case, 256, "xla")
  for tensor in ("out", "dq", "dk", "dv"):
    # Rounding the inputs and outputs to bfloat16 (unit roundoff 2^-9): errors of that order, not zero, not O(1).
    assert 1e-4 < r[f"{tensor}_max_rel"] < 3e-2, (tensor, r)
    assert 0 < r[f"{tensor}_mean_rel"] <= r[f"{tensor}_max_rel"] * 2
  text = precision_report.table([(case, 256, r), ("linear_noncausal", 256, {"error": "ValueError: x"})], "header")
  assert f"| {case} | 256 | " in text and "error: ValueError: x" in text


def test_float32_baseline_compares_one_implementation_in_both_dtypes():
  q, k, v, ct = precision_report.draw(256, 2, 0)
  q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
  attend = lambda q, k, v: linear_attention(q, k, v, causal=True, implementation="xla")  # noqa: E731
  r = precision_report.measure(attend, q, k, v, ct)
  for tensor in ("out", "dq", "dk", "dv"):
    assert 1e-4 < r[f"{tensor}_max_rel"] < 3e-2 and 1e-4 < r[f"{tensor}_rms_rel"] < 3e-2, (tensor, r)
  text = precision_report.float32_table([("linear 256", r)])
  assert text.splitlines()[-1].startswith(f"| linear 256 | {r['out_max_rel']:.1e}, {r['out_rms_rel']:.1e} |")
  # The error statistics themselves: zero for equal tensors, and the stated ratios for a known difference.
  want = [np.array([1.0, -2.0, 4.0])] * 4
  e = precision_report.errors([w + np.array([0.0, 0.0, 0.5]) for w in want], want)
  assert e["out_max_rel"] == pytest.approx(0.125) and e["dv_mean_rel"] == pytest.approx((0.5 / 3) / (7 / 3))
  assert e["dq_rms_rel"] == pytest.approx(np.sqrt((0.25 / 3) / (21 / 3)))
  assert precision_report.errors(want, want)["out_max_rel"] == 0.0
  with pytest.raises(ValueError, match="unknown case 'nope'; valid choices: bigbird, local"):
    precision_report.reference_case("nope")


def test_benchmark_implementation_option_reaches_the_attention():
  options = dict(num_layers=1, batch_size=1, dtype="float32", steps=1, warmup=0, memory_only=True)
  # An explicit "pallas" on CPU never falls back: the option got to the layer. (Measuring with an implementation the
  # device runs compiled a whole Text step here; measure's own path is tests/scripts/test_benchmark.py's.)
  with pytest.raises(KernelUnavailableError, match="implementation='pallas' cannot run on cpu"):
    benchmark.measure("local", 64, implementation="pallas", **options)
