"""Training with context parallelism (`config.mesh.sequence`): a `data=2, sequence=4` run on 8 fake CPU devices
trains like one device (losses, evaluation, checkpoints), a run resumes with another `sequence`, and 2 processes x 2
devices (gloo) with the "sequence" axis across the processes train like one process.

The 8-device runs share ONE subprocess (jax must see 8 devices before it starts); the multi-host job has a hard
per-job time limit (tests/lra/multihost_support.py kills both processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lra.training import train_and_evaluate
from lra.training.metric_writers import read_metrics
from tests.conftest import ROOT, tiny_listops_config, xla_flags
from tests.lra.multihost_support import run_processes, tiny_flags

TIMEOUT = 900
MULTIHOST_TIMEOUT = 240
RTOL = 1e-5

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from lra.training import train_and_evaluate
    from lra.training.metric_writers import read_metrics
    from tests.conftest import tiny_listops_config
    assert jax.device_count() == 8, jax.devices()
    cache, root = sys.argv[1], sys.argv[2]

    def run(name, attention, data, seq, **train):
      config = tiny_listops_config(cache, **{"num_steps": 3, "log_every_steps": 1, "eval_every_steps": 2,
                                             "checkpoint_every_steps": 2, "num_eval_batches": 1, **train})
      config.model.attention.name = attention
      config.model.attention_dropout_rate = 0.1  # the ring's dropout: the counter hash by global position
      config.mesh.data, config.mesh.sequence = data, seq
      final = train_and_evaluate(config, f"{root}/{name}")
      records = read_metrics(f"{root}/{name}")
      return {"train": [r["loss"] for r in records if r["split"] == "train"],
              "eval": [r["loss"] for r in records if r["split"] != "train"], "final": final}

    # Softmax only (the ring); every variant's sharded layer is checked in tests/attention/test_sequence_parallel.py.
    out = {"softmax": {"1x1": run("softmax_1x1", "softmax", 1, 1), "2x4": run("softmax_2x4", "softmax", 2, 4)}}
    # Resume with another sequence: 2 steps on data=2 x sequence=4, then extended to 3 steps on data=4 x sequence=2.
    run("resume", "softmax", 2, 4, num_steps=2)
    out["resumed"] = run("resume", "softmax", 4, 2)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def runs(data_cache, tmp_path_factory):
  root = tmp_path_factory.mktemp("seqpar")
  env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(data_cache), str(root)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_data2_sequence4_trains_like_one_device(runs):
  one, sharded = runs[0]["softmax"]["1x1"], runs[0]["softmax"]["2x4"]
  assert len(one["train"]) == 3 and len(one["eval"]) >= 2
  np.testing.assert_allclose(sharded["train"], one["train"], rtol=RTOL)
  np.testing.assert_allclose(sharded["eval"], one["eval"], rtol=RTOL)
  for split, metrics in one["final"].items():
    for k, v in metrics.items():
      np.testing.assert_allclose(sharded["final"][split][k], v, rtol=RTOL, err_msg=f"{split} {k}")


def test_sharded_run_uses_the_sequence_parallel_forms(runs):
  """The encoder logs one line per layer naming the form its core recorded (kernels.sequence.recording): the ring."""
  lines = [l for l in runs[1].splitlines() if "sequence parallel: " in l and "/block_" in l]
  assert lines and all("(SoftmaxAttention): ring: " in l for l in lines), runs[1][-2000:]
  # One line per layer: the train and eval steps (dense and flash blocks) run the same form.
  assert len({l.split("sequence parallel: ")[1].split(" ")[0] for l in lines}) == len(lines), lines


def test_resume_with_another_sequence_matches_uninterrupted(runs):
  resumed, one = runs[0]["resumed"], runs[0]["softmax"]["1x1"]
  np.testing.assert_allclose(resumed["train"], one["train"], rtol=RTOL)
  # The first call (2 steps) also evaluated its last step on test; the final metrics of the extended run must agree.
  for split, metrics in one["final"].items():
    for k, v in metrics.items():
      np.testing.assert_allclose(resumed["final"][split][k], v, rtol=RTOL, err_msg=f"{split} {k}")


def test_mesh_sequence_must_divide_the_devices():
  from lra.training import sharding
  import ml_collections
  import jax
  n = jax.device_count() + 1
  with pytest.raises(ValueError, match=f"config.mesh.sequence={n}"):
    sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "sequence": n}))


def test_two_processes_with_sequence_across_them_train_like_one(data_cache, tmp_path):
  train = dict(num_steps=3, log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=3, num_eval_batches=1)
  train_and_evaluate(tiny_listops_config(data_cache, **train), tmp_path / "single")
  # 2 processes x 2 devices: data=2 x sequence=2, the "sequence" axis spans the two processes (sharding.make_mesh).
  argv = [*tiny_flags(data_cache, **train), "--config.mesh.sequence=2", f"--workdir={tmp_path / 'mh'}"]
  results = run_processes(argv, timeout=MULTIHOST_TIMEOUT)
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"
  assert "(SoftmaxAttention): ring: " in results[0].stderr
  multi = [r["loss"] for r in read_metrics(tmp_path / "mh") if r["split"] == "train"]
  one = [r["loss"] for r in read_metrics(tmp_path / "single") if r["split"] == "train"]
  assert len(multi) == 3
  np.testing.assert_allclose(multi, one, rtol=RTOL)


@pytest.mark.parametrize("attention_dropout,pos_encoding,refused", [
    (0.1, "learned", "attention dropout"), (0.0, "alibi", "pos_encoding='alibi'"), (0.0, "learned", None)])
def test_config_refuses_what_the_ring_cannot_honour(data_cache, attention_dropout, pos_encoding, refused):
  """An explicit Pallas softmax with mesh.sequence > 1 runs the kernels in the ring, except with attention dropout or
  ALiBi: refused before any data is read, in one line naming the option and mesh.sequence (never run without it)."""
  from lra.training import config_checks
  config = tiny_listops_config(data_cache)
  config.model.attention.name = "softmax"
  config.model.attention.implementation = "pallas"
  config.model.attention_dropout_rate, config.model.pos_encoding = attention_dropout, pos_encoding
  config.mesh.sequence = 4
  problems = config_checks.config_problems(config)
  if refused is None:
    assert problems == []
    return
  assert len(problems) == 1 and refused in problems[0] and "implementation='pallas'" in problems[0], problems
  assert "config.mesh.sequence=4" in problems[0] and "\n" not in problems[0]
  config.mesh.sequence = 1  # one device: the kernels' own rules (ALiBi is refused by the kernels themselves)
  assert not any("mesh.sequence" in p for p in config_checks.config_problems(config))
