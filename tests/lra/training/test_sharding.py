"""Training sharded over 8 fake CPU devices trains like one device (losses, evaluation, checkpoints): data parallel
(`config.mesh.data=8`) and with context parallelism (`config.mesh.sequence`, `data=2, sequence=4`), and a run resumes
with another `sequence`. Two processes with the "sequence" axis across them: tests/lra/test_multihost.py.

The 8-device runs share ONE subprocess (jax must see 8 devices before it starts), and runs share work: the
`data=2, sequence=4` run is the first call of the resumed run, which a second call extends on `data=8` (sequence 1:
the data=8 run's programs, so the persistent compilation cache serves them instead of compiling a third mesh; the ring
on 2 devices runs across processes in tests/lra/test_multihost.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import ROOT, python_path, tiny_listops_config, xla_flags

TIMEOUT = 600
RTOL = 1e-5

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from lra.training import train_and_evaluate
    from lra.training.metric_writers import read_metrics
    from lra.training.trainer import STEPS_PER_SECOND
    from tests.conftest import tiny_listops_config
    assert jax.device_count() == 8, jax.devices()
    cache, root = sys.argv[1], sys.argv[2]

    def run(name, data, seq, **train):
      config = tiny_listops_config(cache, **{"num_steps": 3, "log_every_steps": 1, "eval_every_steps": 2,
                                             "checkpoint_every_steps": 2, "num_eval_batches": 1, **train})
      config.model.attention.name = "softmax"  # the ring; every variant's sharded layer: test_sequence_parallel.py
      config.model.dropout_rate = 0.1  # dropout keys: the same bits whatever the sharding
      config.model.attention_dropout_rate = 0.1  # the ring's dropout: the counter hash by global position
      config.mesh.data, config.mesh.sequence = data, seq
      final = train_and_evaluate(config, f"{root}/{name}")
      records = [{k: v for k, v in r.items() if k != STEPS_PER_SECOND} for r in read_metrics(f"{root}/{name}")]
      return {"train": [r["loss"] for r in records if r["split"] == "train"],
              "eval": {f"{r['step']} {r['split']}": r for r in records if r["split"] != "train"}, "final": final}

    # Checkpoints only at the last step here (orbax saves cost ~1 s each, more on 8 devices); the resumed run below
    # crosses its checkpoint at step 2.
    out = {"1x1": run("one", 1, 1, checkpoint_every_steps=3), "8x1": run("data8", 8, 1, checkpoint_every_steps=3)}
    # 2 steps on data=2 x sequence=4, then extended to 3 steps on data=8 x sequence=1 (a resume with another sequence).
    out["2x4"] = run("resume", 2, 4, num_steps=2)
    out["resumed"] = run("resume", 8, 1)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def runs(data_cache, tmp_path_factory):
  root = tmp_path_factory.mktemp("seqpar")
  env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": python_path()}
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(data_cache), str(root)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _assert_metrics_close(got, want, what):
  assert set(got) == set(want), (what, sorted(got), sorted(want))
  for key, metrics in want.items():
    assert set(got[key]) == set(metrics), (what, key, sorted(got[key]), sorted(metrics))
    for k, v in metrics.items():
      if isinstance(v, str):  # a record's split or phase
        assert got[key][k] == v, (what, key, k)
      else:
        np.testing.assert_allclose(got[key][k], v, rtol=RTOL, err_msg=f"{what}: {key} {k}")


def test_data_parallel_on_8_devices_matches_one_device(runs):
  one, data8 = runs[0]["1x1"], runs[0]["8x1"]
  assert len(one["train"]) == 3 and {"2 validation", "3 validation", "3 test"} <= set(one["eval"])
  np.testing.assert_allclose(data8["train"], one["train"], rtol=2e-5)
  _assert_metrics_close(data8["eval"], one["eval"], "data=8 evaluation")
  _assert_metrics_close(data8["final"], one["final"], "data=8 final")


def test_data2_sequence4_trains_like_one_device(runs):
  one, sharded = runs[0]["1x1"], runs[0]["2x4"]
  np.testing.assert_allclose(sharded["train"], one["train"][:2], rtol=RTOL)
  # Its last step (2) is evaluated on validation (as the one-device run at step 2) and on test (no counterpart).
  _assert_metrics_close({"2 validation": sharded["eval"]["2 validation"]}, {"2 validation": one["eval"]["2 validation"]},
                        "data=2 x sequence=4 evaluation")
  assert set(sharded["eval"]) == {"2 validation", "2 test"} and np.isfinite(sharded["eval"]["2 test"]["loss"])


def test_sharded_run_uses_the_sequence_parallel_forms(runs):
  """The encoder logs one line per layer naming the form its core recorded (kernels.sequence.recording): the ring."""
  lines = [l for l in runs[1].splitlines() if "sequence parallel: " in l and "/block_" in l]
  assert lines and all("(SoftmaxAttention): ring: " in l for l in lines), runs[1][-2000:]
  # One line per layer: the train and eval steps (dense and flash blocks) run the same form.
  assert len({l.split("sequence parallel: ")[1].split(" ")[0] for l in lines}) == len(lines), lines


def test_resume_with_another_sequence_matches_uninterrupted(runs):
  resumed, one = runs[0]["resumed"], runs[0]["1x1"]
  np.testing.assert_allclose(resumed["train"], one["train"], rtol=RTOL)
  # The first call (2 steps) also evaluated its last step on test; every evaluation the one-device run made agrees.
  _assert_metrics_close({k: resumed["eval"][k] for k in one["eval"]}, one["eval"], "resumed evaluation")
  _assert_metrics_close(resumed["final"], one["final"], "resumed final")


def test_mesh_sequence_must_divide_the_devices():
  from lra.training import sharding
  import ml_collections
  import jax
  n = jax.device_count() + 1
  with pytest.raises(ValueError, match=f"config.mesh.sequence={n}"):
    sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "sequence": n}))


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
