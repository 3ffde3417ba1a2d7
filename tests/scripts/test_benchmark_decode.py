"""scripts/benchmark_decode.py: the softmax KV cache grows with the context length, linear attention's state doesn't."""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import load_script, python_path

ROOT = pathlib.Path(__file__).resolve().parents[2]
benchmark_decode = load_script("benchmark_decode")


def test_cache_bytes_grow_for_softmax_and_stay_constant_for_linear(tmp_path):
  cmd = [sys.executable, "scripts/benchmark_decode.py", "--attention=softmax,linear", "--lengths=8,32",
         f"--output_dir={tmp_path}", "--num_layers=1", "--emb_dim=16", "--num_heads=2", "--mlp_dim=32", "--steps=2",
         "--warmup=1"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                        env={**os.environ, "PYTHONPATH": python_path(), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "decode.csv") as f:
    rows = {(r["attention"], int(r["context_length"])): r for r in csv.DictReader(f)}
  assert set(rows) == {("softmax", 8), ("softmax", 32), ("linear", 8), ("linear", 32)}
  cache = {k: int(r["cache_bytes"]) for k, r in rows.items()}
  # Softmax keeps keys and values of every position: 4x the positions, about 4x the bytes.
  assert 3.5 * cache["softmax", 8] < cache["softmax", 32] <= 4 * cache["softmax", 8]
  assert cache["linear", 8] == cache["linear", 32] > 0
  assert all(float(r["ms_per_token"]) > 0 for r in rows.values())
  assert "| softmax | 32 |" in (tmp_path / "decode.md").read_text()
  assert (tmp_path / "decode.png").read_bytes()[:4] == b"\x89PNG"


def test_variants_without_decode_are_refused():
  with pytest.raises(ValueError, match="reformer has no decode path"):
    benchmark_decode.decoder("reformer", 16, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=8, vocab_size=4)
  with pytest.raises(ValueError, match="unknown attention variant"):
    benchmark_decode.decoder("nope", 16, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=8, vocab_size=4)
