"""Preemption: SIGTERM/SIGINT checkpoints at the next step boundary and exits with one line; rerunning the same
command resumes, and the run ends bit-identical to an uninterrupted one (params and every logged metric). One
uninterrupted run (the module fixture) is the reference of both tests.

Several hosts agreeing on the step: tests/lra/test_multihost.py.
"""

import os
import re
import signal

import jax
import numpy as np
import pytest

from lra.tasks import pipeline
from lra.training import Experiment, Preempted, train_and_evaluate
from lra.training import checkpoints as checkpoints_lib
from lra.training.metric_writers import read_metrics
from lra.training.trainer import STEPS_PER_SECOND
from tests.conftest import tiny_listops_config
from tests.lra.multihost_support import run_processes, signal_when, tiny_flags

# Logging every 4 steps: a stop between log steps must carry the unlogged steps' metrics over to the resumed run.
TRAIN = dict(num_steps=12, log_every_steps=4, eval_every_steps=6, checkpoint_every_steps=6)
SLOW = {"LRA_TEST_STEP_SLEEP": "0.25"}  # seconds per training batch, so the signal lands mid-run


def _params(config, workdir):
  exp = Experiment(config)
  ckpt = checkpoints_lib.Checkpoints(workdir)
  try:
    state, meta = ckpt.restore(exp.init_state(), "latest")
  finally:
    ckpt.close()
  return jax.device_get(state.params), meta


def _without_timing(records):
  return [{k: v for k, v in r.items() if k != STEPS_PER_SECOND} for r in records]


def _assert_same_run(config, straight, resumed):
  p1, m1 = _params(config, straight)
  p2, m2 = _params(config, resumed)
  assert m1 == m2 and m1["step"] == config.train.num_steps
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert _without_timing(read_metrics(resumed)) == _without_timing(read_metrics(straight))


@pytest.fixture(name="straight", scope="module")
def _straight(data_cache, tmp_path_factory):
  """The uninterrupted run both tests compare with (one device, as in the subprocess whatever XLA_FLAGS say); also
  makes the data cache."""
  config = tiny_listops_config(data_cache, **TRAIN)
  config.mesh.data = 1
  workdir = tmp_path_factory.mktemp("straight")
  train_and_evaluate(config, workdir)
  return config, workdir


def test_sigterm_to_train_py_checkpoints_exits_with_one_line_and_the_rerun_matches(data_cache, tmp_path, straight):
  config, straight_dir = straight
  argv = [*tiny_flags(data_cache, **TRAIN), "--config.mesh.data=1", f"--workdir={tmp_path / 'stopped'}"]
  [first] = run_processes(argv, num_processes=1, env=SLOW, timeout=240,
                          on_output=signal_when("batch 4", signal.SIGTERM, targets=[0]))
  assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
  lines = [line for line in first.stderr.splitlines() if line.startswith("preempted")]
  assert len(lines) == 1, first.stderr[-3000:]
  step = int(re.match(r"preempted \(SIGTERM\) at step (\d+): checkpoint saved", lines[0]).group(1))
  assert 5 <= step < TRAIN["num_steps"], lines
  assert lines[0].endswith("rerun the same command to resume")
  assert (tmp_path / "stopped" / "checkpoints" / str(step)).exists()

  # The rerun in this process (the config the flags give): what the command line does is tested above, and a rerun
  # of the same command through train.py in tests/lra/test_multihost.py.
  train_and_evaluate(config, tmp_path / "stopped")
  _assert_same_run(config, straight_dir, tmp_path / "stopped")


def test_sigint_stops_at_the_step_boundary_in_process(tmp_path, straight, monkeypatch):
  config, straight_dir = straight
  original = pipeline.TrainBatches.__getitem__

  def interrupt_during_step_7(self, index):
    if index == 6:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 7's batch is prepared: step 7 still completes
    return original(self, index)

  monkeypatch.setattr(pipeline.TrainBatches, "__getitem__", interrupt_during_step_7)
  # A known handler before the run (an earlier test in this worker process may have left SIGINT ignored), restored
  # after the test; the run must hand back exactly the one it found.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(Preempted, match=r"preempted \(SIGINT\) at step 7: checkpoint saved") as info:
      train_and_evaluate(config, tmp_path / "stopped")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
  finally:
    signal.signal(signal.SIGINT, previous)
  assert info.value.exit_code == 130
  assert max(r["step"] for r in read_metrics(tmp_path / "stopped")) == 6  # step 7 is pending, in the checkpoint
  monkeypatch.setattr(pipeline.TrainBatches, "__getitem__", original)
  train_and_evaluate(config, tmp_path / "stopped")
  _assert_same_run(config, straight_dir, tmp_path / "stopped")
