"""The training loop: it learns, resumes exactly, stops on NaN, evaluates checkpoints. Data parallel on 8 devices:
tests/lra/training/test_sharding.py.

Runs are shared: one 60-step run is the one that learns and the one whose checkpoints are evaluated; one uninterrupted
20-step run is the reference of the run that is extended, crashes and resumes."""

import json

import jax
import numpy as np
import pytest

from lra.tasks import pipeline
from lra.training import Experiment, evaluate_checkpoint, train_and_evaluate
from lra.training import checkpoints as checkpoints_lib
from lra.training.trainer import STEPS_PER_SECOND
from lra.training.metric_writers import read_metrics
from tests.conftest import tiny_listops_config


def _params(config, workdir, which="latest"):
  exp = Experiment(config)
  ckpt = checkpoints_lib.Checkpoints(workdir)
  try:
    state, meta = ckpt.restore(exp.init_state(), which)
  finally:
    ckpt.close()
  return jax.device_get(state.params), meta


@pytest.fixture(scope="module")
def trained(data_cache, tmp_path_factory):
  """(config, workdir) of a 60-step run evaluated and checkpointed at steps 30 and 60, and its final metrics."""
  config = tiny_listops_config(data_cache, num_steps=60, learning_rate=0.02, eval_every_steps=30,
                               checkpoint_every_steps=30)
  workdir = tmp_path_factory.mktemp("trained")
  return config, workdir, train_and_evaluate(config, workdir)


def test_training_lowers_the_loss_and_writes_the_workdir(trained):
  _, workdir, final = trained
  train = [r for r in read_metrics(workdir) if r["split"] == "train"]
  first, last = np.mean([r["loss"] for r in train[:2]]), np.mean([r["loss"] for r in train[-2:]])
  assert last < first - 0.1, (first, last)
  assert set(final) == {"validation", "test"}
  assert {"accuracy", "loss"} <= set(final["test"])
  assert json.loads((workdir / "config.json").read_text())["task"] == "listops"
  assert list(workdir.glob("events.out.tfevents.*"))
  assert (workdir / "checkpoints" / "60").exists() and list((workdir / "best").iterdir())
  splits = {(r["step"], r["split"]) for r in read_metrics(workdir)}
  assert {(30, "validation"), (60, "validation"), (60, "test"), (60, "train")} <= splits


@pytest.fixture(scope="module")
def straight(data_cache, tmp_path_factory):
  """(config, workdir) of an uninterrupted 20-step run with dropout (its keys must be resumed too)."""
  config = tiny_listops_config(data_cache, num_steps=20, checkpoint_every_steps=10, log_every_steps=5)
  config.model.dropout_rate = 0.1
  workdir = tmp_path_factory.mktemp("straight")
  train_and_evaluate(config, workdir)
  return config, workdir


def test_a_finished_run_extends_and_a_crash_resumes_as_an_uninterrupted_run(straight, tmp_path, monkeypatch):
  # One workdir for both (each train_and_evaluate call retraces and lowers its steps, ~5 s): a finished 10-step run is
  # extended to 20 steps, the extension crashes at step 16 after steps 11-15 were logged past the step-10 checkpoint,
  # and the rerun resumes from that checkpoint. Parameters and the log then equal the uninterrupted run's.
  config, straight_dir = straight
  resumed = tmp_path / "resumed"
  short = config.copy_and_resolve_references()
  short.train.num_steps = 10
  train_and_evaluate(short, resumed)

  original = pipeline.TrainBatches.__getitem__

  def crash_at_step_16(self, index):
    if index == 15:  # the batch of step 16: steps 11-15 ran and were logged
      raise KeyboardInterrupt("simulated crash")
    return original(self, index)

  monkeypatch.setattr(pipeline.TrainBatches, "__getitem__", crash_at_step_16)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, resumed)
  assert max(r["step"] for r in read_metrics(resumed)) == 15  # the finished run went on, logged past its checkpoint
  monkeypatch.setattr(pipeline.TrainBatches, "__getitem__", original)
  train_and_evaluate(config, resumed)

  p1, m1 = _params(config, straight_dir)
  p2, m2 = _params(config, resumed)
  assert m1["step"] == m2["step"] == 20
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  drop_timing = lambda records: [{k: v for k, v in r.items() if k != STEPS_PER_SECOND} for r in records]  # noqa: E731
  # The finished 10-step run's own final test evaluation stays in the log; every other record is the straight run's.
  records = drop_timing(read_metrics(resumed))
  assert [r for r in records if (r["step"], r["split"]) != (10, "test")] == drop_timing(read_metrics(straight_dir))
  assert any((r["step"], r["split"]) == (10, "test") for r in records)


def test_nan_loss_stops_with_the_step(data_cache, tmp_path, monkeypatch):
  config = tiny_listops_config(data_cache, num_steps=20)
  original = pipeline.TrainBatches.__getitem__

  def poisoned(self, index):
    batch = original(self, index)
    if index == 6:  # the batch of step 7: an out-of-range label makes the loss NaN
      batch = {**batch, "targets": np.full_like(batch["targets"], 99)}
    return batch

  monkeypatch.setattr(pipeline.TrainBatches, "__getitem__", poisoned)
  with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 7"):
    train_and_evaluate(config, tmp_path)
  # Nothing poisoned was checkpointed: the first checkpoint step (10) comes after the check.
  assert not (tmp_path / "checkpoints" / "10").exists()


def test_evaluate_checkpoint_writes_json(trained, tmp_path):
  config, workdir, final = trained
  result = evaluate_checkpoint(config, workdir, "test", "latest")
  assert result["step"] == 60
  assert result["accuracy"] == pytest.approx(final["test"]["accuracy"])
  assert json.loads((workdir / "eval_test.json").read_text()) == result
  best = evaluate_checkpoint(config, workdir, "validation", "best")
  assert best["step"] in (30, 60)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    evaluate_checkpoint(config, workdir, "dev")
  with pytest.raises(FileNotFoundError, match="no 'best' checkpoint"):
    evaluate_checkpoint(config, tmp_path / "empty", "test")


def test_eval_batches_weight_padding_rows():
  from lra.tasks.base import ArrayDataset
  ds = ArrayDataset({"x": np.arange(10)})
  batches = list(pipeline.eval_batches(ds, batch_size=4))
  assert [b["weights"].tolist() for b in batches][-1] == [1, 1, 0, 0]
  seen = np.concatenate([b["x"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(seen, np.arange(10))
