"""scripts/benchmark.py end to end in subprocesses: two variants at tiny lengths side by side, and a crashing or
hanging variant that becomes a cell of the table instead of ending the run."""

import csv
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "benchmark.py"
TINY = ["--lengths=64,128", "--num_layers=1", "--steps=1", "--warmup=0"]


def _run(args, tmp_path, fault="", timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "BENCHMARK_FAULT": fault}
  proc = subprocess.run([sys.executable, str(SCRIPT), f"--output_dir={tmp_path}", *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "benchmark.csv") as f:
    rows = {(r["variant"], int(r["length"])): r for r in csv.DictReader(f)}
  return proc, rows


def test_two_variants_side_by_side_and_a_crash_is_a_cell(tmp_path):
  # softmax (the baseline, always measured) and linear run; local's worker dies at every length.
  proc, rows = _run(["--attention=linear,local", *TINY, "--timeout=240"], tmp_path, fault="local=crash")
  assert set(rows) == {(v, n) for v in ("softmax", "linear", "local") for n in (64, 128)}
  for n in (64, 128):
    softmax, linear, local = rows["softmax", n], rows["linear", n], rows["local", n]
    assert softmax["status"] == linear["status"] == "ok", (softmax, linear)
    assert float(softmax["speedup"]) == 1.0 and float(softmax["memory_ratio"]) == 1.0
    assert float(linear["steps_per_s"]) > 0 and int(linear["memory_bytes"]) > 0
    assert abs(float(linear["speedup"]) - float(linear["steps_per_s"]) / float(softmax["steps_per_s"])) < 1e-9
    assert local["status"] == "error" and "simulated crash" in local["error"], local
    assert softmax["lra_name"] == "Transformer" and linear["lra_name"] == "Linear Trans."
  # XLA's compiled memory is deterministic: a longer sequence needs more.
  assert int(rows["softmax", 128]["memory_bytes"]) > int(rows["softmax", 64]["memory_bytes"])

  markdown = (tmp_path / "benchmark.md").read_text()
  assert markdown in proc.stdout  # printed at the end
  assert "- jax " in markdown and "- command: `python scripts/benchmark.py" in markdown
  table = [line for line in markdown.splitlines() if line.startswith("| ")]
  assert any(line.startswith("| softmax | Transformer | 1.00× | 1.00× |") for line in table), table
  assert any(line.startswith("| local | Local Attention | error: ") and "simulated crash" in line for line in table)
  assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_hanging_variant_times_out_and_its_longer_lengths_are_skipped(tmp_path):
  proc, rows = _run(["--attention=softmax", *TINY, "--timeout=8"], tmp_path, fault="softmax=hang@64")
  assert rows["softmax", 64]["status"] == "timeout"
  assert rows["softmax", 128]["status"] == "skipped" and "timeout at length 64" in rows["softmax", 128]["error"]
  assert "| softmax | Transformer | timeout | skipped |" in proc.stdout


def test_unknown_variant_is_a_one_line_error(tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), f"--output_dir={tmp_path}", "--attention=softmax,nope"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown attention variant(s) ['nope']")
