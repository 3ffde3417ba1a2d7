"""scripts/benchmark.py end to end in subprocesses: a variant at tiny lengths side by side with both softmax baselines
(flash and dense), a crashing, raising or hanging worker that becomes a cell of the table instead of ending the run;
the `--core` and `--sequence_parallel` modes and the variant check in process (the functions main calls)."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "benchmark.py"
benchmark = load_script("benchmark", "benchmark")
# Importable by name, as the sequence-parallel worker imports benchmark_sequence._measure_cell (it starts with this
# sys.path).
sys.path.insert(0, str(ROOT / "scripts"))
benchmark_sequence = load_script("benchmark_sequence", "benchmark_sequence")
TINY = ["--lengths=64,128", "--num_layers=1", "--steps=1", "--warmup=0"]


def _run(args, tmp_path, fault="", timeout=600):  # a guard against hangs; a loaded 2-core CI needs minutes
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "BENCHMARK_FAULT": fault}
  proc = subprocess.run([sys.executable, str(SCRIPT), f"--output_dir={tmp_path}", *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "benchmark.csv") as f:
    rows = {(r["variant"], int(r["length"])): r for r in csv.DictReader(f)}
  return proc, rows


def test_a_variant_beside_both_baselines_and_failures_are_cells(tmp_path):
  # softmax and softmax-dense (the baselines, always measured) run at both lengths; linear runs at 64 and its worker
  # dies at 128 (a crash is a cell, not the end of the run). One worker fewer than a fourth variant would cost; the
  # error cell raised inside a worker is the hanging test's softmax-dense.
  proc, rows = _run(["--attention=linear", *TINY, "--timeout=240"], tmp_path, fault="linear=crash@128")
  assert set(rows) == {(v, n) for v in ("softmax", "softmax-dense", "linear") for n in (64, 128)}
  for n in (64, 128):
    softmax, dense = rows["softmax", n], rows["softmax-dense", n]
    assert softmax["status"] == dense["status"] == "ok", (softmax, dense)
    assert float(softmax["speedup"]) == 1.0 and float(softmax["memory_ratio"]) == 1.0
    assert float(dense["speedup_dense"]) == 1.0 and float(dense["memory_ratio_dense"]) == 1.0
    assert dense["lra_name"] == "Transformer" and rows["linear", n]["lra_name"] == "Linear Trans."
    assert not softmax["lra_name"]
  linear = rows["linear", 64]
  assert linear["status"] == "ok", linear
  assert float(linear["steps_per_s"]) > 0 and int(linear["memory_bytes"]) > 0
  for suffix, base in (("", rows["softmax", 64]), ("_dense", rows["softmax-dense", 64])):
    want = float(linear["steps_per_s"]) / float(base["steps_per_s"])
    assert abs(float(linear[f"speedup{suffix}"]) - want) < 1e-9
    want = int(linear["memory_bytes"]) / int(base["memory_bytes"])
    assert abs(float(linear[f"memory_ratio{suffix}"]) - want) < 1e-9
  crashed = rows["linear", 128]
  assert crashed["status"] == "error" and "simulated crash of linear at length 128" in crashed["error"], crashed
  # XLA's compiled memory is deterministic: a longer sequence needs more.
  assert int(rows["softmax", 128]["memory_bytes"]) > int(rows["softmax", 64]["memory_bytes"])

  markdown = (tmp_path / "benchmark.md").read_text()
  assert markdown in proc.stdout  # printed at the end
  assert "- jax " in markdown and "- command: `python scripts/benchmark.py" in markdown
  table = [line for line in markdown.splitlines() if line.startswith("| ")]
  assert any(line.startswith("| softmax | - | 1.00× | 1.00× |") for line in table), table
  assert any(line.startswith("| softmax-dense | Transformer | 1.00× | 1.00× |") for line in table), table
  assert "Speed-up over softmax (flash, the default)" in markdown and "Speed-up over softmax-dense" in markdown
  assert any(line.startswith("| linear | Linear Trans. | ") and "| error: " in line and "simulated crash" in line
             for line in table), table
  assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_hanging_variant_times_out_and_its_longer_lengths_are_skipped(tmp_path):
  # The time limit counts from the worker's start, so a hang at the first length costs only the (short) limit.
  # softmax-dense raises at every length in its worker: an error cell with the worker alive, or under heavy load a
  # timeout of its own (the limit is shorter than a loaded start-up); it compiles nothing either way.
  proc, rows = _run(["--attention=softmax", *TINY, "--timeout=4"], tmp_path,
                    fault="softmax=hang@64,softmax-dense=error")
  assert rows["softmax", 64]["status"] == "timeout"
  assert rows["softmax", 128]["status"] == "skipped" and "timeout at length 64" in rows["softmax", 128]["error"]
  assert "| softmax | - | timeout | skipped |" in proc.stdout
  dense = rows["softmax-dense", 64]
  assert dense["status"] == "timeout" or (
      dense["status"] == "error" and "simulated error of softmax-dense at length 64" in dense["error"]), dense


def test_unknown_variant_is_refused_before_anything_runs():
  # In process: `run` checks the variants before it makes a folder or starts a worker; cli.run turns the ValueError
  # into the one `error:` line and exit status 2 (tests/lra/test_cli.py checks that on train.py and eval.py).
  with pytest.raises(ValueError, match=r"unknown attention variant\(s\) \['nope'\] in --attention; valid choices: "):
    benchmark._variants(["softmax", "nope"])
  assert benchmark._variants(["linear", "softmax", "linear"]) == ["softmax", "softmax-dense", "linear"]


def test_core_mode_measures_one_core_beside_both_softmax_baselines(tmp_path):
  # In process: benchmark.py --core calls run_core with its flags' values and prints what it returns (the command line
  # itself is the main run's test); the same measuring code, one interpreter start fewer.
  argv = ["benchmark.py", "--core=block_sparse"]
  markdown = benchmark.run_core(argv, core="block_sparse", lengths=[64, 128], output_dir=str(tmp_path), batch=2,
                                heads=1, head_dim=8, steps=1, warmup=0, causal=True, dropout_rate=0.1, block_size=32,
                                band=1)
  with open(tmp_path / "core.csv") as f:
    rows = {(r["implementation"], int(r["length"])): r for r in csv.DictReader(f)}
  names = ("softmax", "softmax-dense", "block_sparse", "block_sparse-reference")
  assert set(rows) == {(v, n) for v in names for n in (64, 128)}
  for n in (64, 128):
    flash, dense, sparse = rows["softmax", n], rows["softmax-dense", n], rows["block_sparse", n]
    assert all(r["status"] == "ok" for r in (flash, dense, sparse)), (flash, dense, sparse)
    assert float(flash["speedup"]) == 1.0 and float(dense["memory_ratio_dense"]) == 1.0
    assert abs(float(sparse["speedup_dense"]) - float(dense["call_ms"]) / float(sparse["call_ms"])) < 1e-9
    assert abs(float(sparse["memory_ratio"]) - int(sparse["memory_bytes"]) / int(flash["memory_bytes"])) < 1e-9
  # The dense forms grow quadratically: 2x the length is more than 2x their compiled memory's attention part.
  assert int(rows["softmax-dense", 128]["memory_bytes"]) > int(rows["softmax-dense", 64]["memory_bytes"])
  assert (tmp_path / "core.md").read_text() == markdown and "block_sparse core, forward + backward" in markdown


def test_sequence_parallel_mode_measures_the_sharded_step_per_device(tmp_path):
  # One cell (linear, 64 tokens, sequence=2, no sequence=1 baseline): the step compiled on 2 fake devices in a worker
  # of the pool, its per-device memory in the table and the JSON lines. benchmark.py --sequence_parallel=2 calls
  # benchmark_sequence.run with its flags' values; called here in process (the worker is still its own process).
  markdown = benchmark_sequence.run(["linear"], [64], 2, num_layers=1, batch_size=1, dtype="float32", steps=10,
                                    memory_only=True, output_dir=tmp_path, baseline=False, timeout=300)
  (record,) = [json.loads(line) for line in (tmp_path / "sequence_parallel.jsonl").read_text().splitlines()]
  assert record["variant"] == "linear" and record["sequence"] == 2 and "error" not in record, record
  assert record["memory_bytes"] > 0
  assert "| linear | 64 | - | " in markdown and (tmp_path / "logs" / "linear.64.sequence=2.0.log").exists()


def test_benchmark_adaptive_pools_compressed_tokens_as_the_gather_does():
  """The nsa core of scripts/benchmark_adaptive.py mean-pools its compressed tokens from stride means (no gather of
  `[Nc, l]` keys): the same tokens as the mean of each gathered block of l keys every d."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  adaptive = load_script("benchmark_adaptive", "benchmark_adaptive")
  x = jax.random.normal(jax.random.key(0), (2, 100, 2, 8))
  for block, stride in ((32, 16), (12, 4), (8, 8)):
    n = (100 - block) // stride + 1
    starts = np.arange(n) * stride
    gathered = jnp.mean(x[:, starts[:, None] + np.arange(block)], axis=2)
    np.testing.assert_allclose(adaptive.mean_pooled(x, block, stride), gathered, atol=1e-6)
