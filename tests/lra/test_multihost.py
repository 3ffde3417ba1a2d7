"""Multi-host: train.py in 2 processes x 2 CPU devices (gloo) finishes, checkpoints and matches one process; a
SIGTERM to one process stops both at the same step, and the rerun matches one process.

Each job has a hard time limit (multihost_support.run_processes kills both processes), so a deadlock at a checkpoint
barrier fails this test within TIMEOUT seconds instead of blocking the suite.
"""

import re
import signal
import time

import numpy as np

from lra.training import train_and_evaluate
from lra.training.metric_writers import read_metrics
from tests.conftest import tiny_listops_config
from tests.lra.multihost_support import run_processes, signal_when, tiny_flags

# Hard limit for the 2-process job: it takes 80-110 s on a 2-core machine shared by many jobs (load average ~27), a
# few seconds per step otherwise; a deadlock fails the test at this limit instead of blocking the suite.
TIMEOUT = 240
TRAIN = dict(num_steps=6, log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=3)


def test_two_processes_train_like_one_and_finish(data_cache, tmp_path):
  # Evaluating at 3 and 6 saves `best` and `latest` at the same steps: the collision that used to deadlock.
  # The single-process run first: it also generates the data cache the two processes then share.
  train_and_evaluate(tiny_listops_config(data_cache, **TRAIN), tmp_path / "single")
  start = time.monotonic()
  results = run_processes([*tiny_flags(data_cache, **TRAIN), f"--workdir={tmp_path / 'mh'}"], timeout=TIMEOUT)
  print(f"2 processes x 2 devices: {time.monotonic() - start:.1f} s")
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"
  multi = [r for r in read_metrics(tmp_path / "mh") if r["split"] == "train"]
  single = [r for r in read_metrics(tmp_path / "single") if r["split"] == "train"]
  assert [r["step"] for r in multi] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=2e-5)
  assert sorted(p.name for p in (tmp_path / "mh" / "checkpoints").iterdir()) == ["3", "6"]  # no *-tmp left behind
  assert len(list((tmp_path / "mh" / "best").iterdir())) == 1


def test_sigterm_on_one_host_stops_every_host_at_the_same_step(data_cache, tmp_path):
  train = dict(num_steps=10, log_every_steps=2, eval_every_steps=5, checkpoint_every_steps=5)
  train_and_evaluate(tiny_listops_config(data_cache, **train), tmp_path / "single")
  argv = [*tiny_flags(data_cache, **train), f"--workdir={tmp_path / 'mh'}"]
  # Only process 1 is told (a preemption notice reaches one VM); jax's coordination service tells process 0.
  first = run_processes(argv, env={"LRA_TEST_STEP_SLEEP": "0.25"}, timeout=TIMEOUT,
                        on_output=signal_when("batch 3", signal.SIGTERM, targets=[1]))
  steps = []
  for i, r in enumerate(first):
    assert r.returncode == 128 + signal.SIGTERM, f"process {i}:\n{r.stderr[-3000:]}"
    steps += [int(m) for m in re.findall(r"^preempted \(SIGTERM\) at step (\d+)", r.stderr, re.MULTILINE)]
  assert len(steps) == 2 and steps[0] == steps[1] < train["num_steps"], steps

  second = run_processes(argv, timeout=TIMEOUT)
  for i, r in enumerate(second):
    assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"
  multi = [r for r in read_metrics(tmp_path / "mh") if r["split"] == "train"]
  single = [r for r in read_metrics(tmp_path / "single") if r["split"] == "train"]
  assert [r["step"] for r in multi] == [r["step"] for r in single]
  np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=2e-5)
