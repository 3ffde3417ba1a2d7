"""scripts/kernel_tolerance.py (bf16 implementation vs float32 reference) and benchmark.py's --implementation option,
in process on CPU at tiny lengths."""

import pytest

from kernels.platform import KernelUnavailableError
from tests.conftest import load_script

kernel_tolerance = load_script("kernel_tolerance")
benchmark = load_script("benchmark", "benchmark")


@pytest.mark.parametrize("case", ["bigbird", "local", "linear_causal"])
def test_bf16_xla_errors_are_bfloat16_sized_and_reported(case):
  r = kernel_tolerance.measure(case, 256, "xla")
  for tensor in ("out", "dq", "dk", "dv"):
    # Rounding the inputs and outputs to bfloat16 (unit roundoff 2^-9): errors of that order, not zero, not O(1).
    assert 1e-4 < r[f"{tensor}_max_rel"] < 3e-2, (tensor, r)
    assert 0 < r[f"{tensor}_mean_rel"] <= r[f"{tensor}_max_rel"] * 2
  text = kernel_tolerance.table([(case, 256, r), ("linear_noncausal", 256, {"error": "ValueError: x"})], "header")
  assert f"| {case} | 256 | " in text and "error: ValueError: x" in text


def test_benchmark_implementation_option_reaches_the_attention():
  options = dict(num_layers=1, batch_size=1, dtype="float32", steps=1, warmup=0, memory_only=True)
  assert benchmark.measure("local", 64, implementation="xla", **options)["memory_bytes"] > 0
  # An explicit "pallas" on CPU never falls back: the option got to the layer.
  with pytest.raises(KernelUnavailableError, match="implementation='pallas' cannot run on cpu"):
    benchmark.measure("local", 64, implementation="pallas", **options)
