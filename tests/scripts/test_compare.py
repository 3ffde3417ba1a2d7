"""scripts/compare.py: one config, several attention variants, one table."""

import csv
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

TINY = ["--config.train.num_steps=6", "--config.train.log_every_steps=2", "--config.train.eval_every_steps=6",
        "--config.train.checkpoint_every_steps=6", "--config.train.batch_size=8", "--config.train.eval_batch_size=16",
        "--config.model.num_layers=1", "--config.model.emb_dim=16", "--config.model.qkv_dim=16",
        "--config.model.mlp_dim=32", "--config.model.head_mlp_dim=32", "--config.model.num_heads=2",
        "--config.data.max_length=32", "--config.data.generate.num_train=64", "--config.data.generate.num_val=16",
        "--config.data.generate.num_test=16", "--config.data.generate.min_length=8",
        "--config.data.generate.max_length=32"]


def test_compare_two_variants(tmp_path, data_cache):
  cmd = [sys.executable, "scripts/compare.py", "--config", "configs/lra/listops.py:runlocal",
         "--attention=softmax,linear", f"--workdir={tmp_path}", f"--config.data.cache_dir={data_cache}", *TINY]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "compare.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["attention"] for r in rows] == ["softmax", "linear"]
  for row in rows:
    assert 0.0 <= float(row["test accuracy"]) <= 1.0
    assert int(row["parameters"]) > 1000 and float(row["steps/s"]) > 0
  # Same parameter shapes: linear attention reuses softmax's projections.
  assert rows[0]["parameters"] == rows[1]["parameters"]
  assert "| softmax |" in (tmp_path / "compare.md").read_text()
