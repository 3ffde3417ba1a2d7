"""scripts/benchmark.py end to end in subprocesses: two variants at tiny lengths side by side with both softmax
baselines (flash and dense), a crashing or hanging variant that becomes a cell of the table instead of ending the run,
and the `--core` mode."""

import csv
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "benchmark.py"
TINY = ["--lengths=64,128", "--num_layers=1", "--steps=1", "--warmup=0"]


def _run(args, tmp_path, fault="", timeout=600):  # a guard against hangs; a loaded 2-core CI needs minutes
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "BENCHMARK_FAULT": fault}
  proc = subprocess.run([sys.executable, str(SCRIPT), f"--output_dir={tmp_path}", *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "benchmark.csv") as f:
    rows = {(r["variant"], int(r["length"])): r for r in csv.DictReader(f)}
  return proc, rows


def test_two_variants_side_by_side_and_a_crash_is_a_cell(tmp_path):
  # softmax and softmax-dense (the baselines, always measured) and linear run; local's worker dies at every length.
  proc, rows = _run(["--attention=linear,local", *TINY, "--timeout=240"], tmp_path, fault="local=crash")
  assert set(rows) == {(v, n) for v in ("softmax", "softmax-dense", "linear", "local") for n in (64, 128)}
  for n in (64, 128):
    softmax, dense, linear, local = rows["softmax", n], rows["softmax-dense", n], rows["linear", n], rows["local", n]
    assert softmax["status"] == dense["status"] == linear["status"] == "ok", (softmax, dense, linear)
    assert float(softmax["speedup"]) == 1.0 and float(softmax["memory_ratio"]) == 1.0
    assert float(dense["speedup_dense"]) == 1.0 and float(dense["memory_ratio_dense"]) == 1.0
    assert float(linear["steps_per_s"]) > 0 and int(linear["memory_bytes"]) > 0
    for suffix, base in (("", softmax), ("_dense", dense)):
      want = float(linear["steps_per_s"]) / float(base["steps_per_s"])
      assert abs(float(linear[f"speedup{suffix}"]) - want) < 1e-9
      want = int(linear["memory_bytes"]) / int(base["memory_bytes"])
      assert abs(float(linear[f"memory_ratio{suffix}"]) - want) < 1e-9
    assert local["status"] == "error" and "simulated crash" in local["error"], local
    assert dense["lra_name"] == "Transformer" and linear["lra_name"] == "Linear Trans." and not softmax["lra_name"]
  # XLA's compiled memory is deterministic: a longer sequence needs more.
  assert int(rows["softmax", 128]["memory_bytes"]) > int(rows["softmax", 64]["memory_bytes"])

  markdown = (tmp_path / "benchmark.md").read_text()
  assert markdown in proc.stdout  # printed at the end
  assert "- jax " in markdown and "- command: `python scripts/benchmark.py" in markdown
  table = [line for line in markdown.splitlines() if line.startswith("| ")]
  assert any(line.startswith("| softmax | - | 1.00× | 1.00× |") for line in table), table
  assert any(line.startswith("| softmax-dense | Transformer | 1.00× | 1.00× |") for line in table), table
  assert "Speed-up over softmax (flash, the default)" in markdown and "Speed-up over softmax-dense" in markdown
  assert any(line.startswith("| local | Local Attention | error: ") and "simulated crash" in line for line in table)
  assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_hanging_variant_times_out_and_its_longer_lengths_are_skipped(tmp_path):
  proc, rows = _run(["--attention=softmax", *TINY, "--timeout=8"], tmp_path, fault="softmax=hang@64")
  assert rows["softmax", 64]["status"] == "timeout"
  assert rows["softmax", 128]["status"] == "skipped" and "timeout at length 64" in rows["softmax", 128]["error"]
  assert "| softmax | - | timeout | skipped |" in proc.stdout
  assert ("softmax-dense", 64) in rows  # the other baseline is its own worker (its 8 s limit may pass under load)


def test_unknown_variant_is_a_one_line_error(tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), f"--output_dir={tmp_path}", "--attention=softmax,nope"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown attention variant(s) ['nope']")


def test_core_mode_measures_one_core_beside_both_softmax_baselines(tmp_path):
  args = ["--core=block_sparse", "--lengths=64,128", "--core_block_size=32", "--core_band=1", "--core_heads=1",
          "--core_head_dim=8", "--core_causal", "--core_dropout=0.1", "--steps=1", "--warmup=0"]
  proc = subprocess.run([sys.executable, str(SCRIPT), f"--output_dir={tmp_path}", *args], capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "core.csv") as f:
    rows = {(r["implementation"], int(r["length"])): r for r in csv.DictReader(f)}
  names = ("softmax", "softmax-dense", "block_sparse", "block_sparse-reference")
  assert set(rows) == {(v, n) for v in names for n in (64, 128)}
  for n in (64, 128):
    flash, dense, sparse = rows["softmax", n], rows["softmax-dense", n], rows["block_sparse", n]
    assert all(r["status"] == "ok" for r in (flash, dense, sparse))
    assert float(flash["speedup"]) == 1.0 and float(dense["memory_ratio_dense"]) == 1.0
    assert abs(float(sparse["speedup_dense"]) - float(dense["call_ms"]) / float(sparse["call_ms"])) < 1e-9
    assert abs(float(sparse["memory_ratio"]) - int(sparse["memory_bytes"]) / int(flash["memory_bytes"])) < 1e-9
  # The dense forms grow quadratically: 2x the length is more than 2x their compiled memory's attention part.
  assert int(rows["softmax-dense", 128]["memory_bytes"]) > int(rows["softmax-dense", 64]["memory_bytes"])
  markdown = (tmp_path / "core.md").read_text()
  assert markdown in proc.stdout and "block_sparse core, forward + backward" in markdown


def test_sequence_parallel_mode_measures_the_sharded_step_per_device(tmp_path):
  # One cell (linear, 64 tokens, sequence=2, no sequence=1 baseline): the step compiled on 2 fake devices through the
  # worker pool, its per-device memory in the table and the JSON lines.
  args = ["--sequence_parallel=2", "--nosequence_baseline", "--memory_only", "--attention=linear", "--lengths=64",
          "--num_layers=1", "--batch_size=1"]
  proc = subprocess.run([sys.executable, str(SCRIPT), f"--output_dir={tmp_path}", *args], capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (record,) = [json.loads(line) for line in (tmp_path / "sequence_parallel.jsonl").read_text().splitlines()]
  assert record["variant"] == "linear" and record["sequence"] == 2 and "error" not in record, record
  assert record["memory_bytes"] > 0
  assert "| linear | 64 | - | " in proc.stdout and (tmp_path / "logs" / "linear.64.sequence=2.0.log").exists()
