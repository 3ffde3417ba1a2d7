"""scripts/sweep.py on a two-point sweep: one workdir per point, train + test evaluation, finished points skipped,
interrupted points resumed; points N at a time; the command line with get_sweep() and dotted overrides."""

import json
import pathlib
import subprocess
import sys

import pytest

from configs.lra import text as text_config
from lra.tasks import pipeline
from lra.training.metric_writers import read_metrics
from tests.conftest import tiny_listops_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Importable by name, as the point processes of a parallel sweep import it (they start with this sys.path).
sys.path.insert(0, str(ROOT / "scripts"))
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top

POINTS = [{"train.learning_rate": 1e-3}, {"train.learning_rate": 3e-3}]
NAMES = ["learning_rate=0.001", "learning_rate=0.003"]


def _config(data_cache, num_steps=10):
  return tiny_listops_config(data_cache, num_steps=num_steps, eval_every_steps=5, checkpoint_every_steps=5)


def test_two_points_run_skip_and_resume(data_cache, tmp_path, monkeypatch):
  original = pipeline.TrainBatches.__getitem__
  calls = {"n": 0}

  def crash_in_second_point(self, index):
    calls["n"] += 1
    if calls["n"] == 10 + 7:  # point 1 takes 10 batches; point 2 crashes on its 7th (after its step-5 checkpoint)
      raise KeyboardInterrupt("simulated crash")
    return original(self, index)

  monkeypatch.setattr(pipeline.TrainBatches, "__getitem__", crash_in_second_point)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(_config(data_cache), POINTS, tmp_path)
  monkeypatch.setattr(pipeline.TrainBatches, "__getitem__", original)
  first, second = (tmp_path / n for n in NAMES)
  assert (first / "eval_test.json").exists() and not (second / "eval_test.json").exists()
  assert sweep.status(_config(data_cache), second, "test") == "partial"
  assert (second / "checkpoints" / "5").exists()

  calls["n"] = 0
  monkeypatch.setattr(pipeline.TrainBatches, "__getitem__", crash_in_second_point)  # counts; no crash this time
  outcome = sweep.run_sweep(_config(data_cache), POINTS, tmp_path)
  assert outcome[NAMES[0]] == "done (skipped)" and outcome[NAMES[1]].startswith("test accuracy ")
  assert calls["n"] == 5  # resumed from the step-5 checkpoint: only steps 6..10 were trained
  assert [r["step"] for r in read_metrics(second) if r["split"] == "train"] == [5, 10]
  for name, point in zip(NAMES, POINTS):
    assert json.loads((tmp_path / name / "sweep_point.json").read_text()) == point
    assert json.loads((tmp_path / name / "config.json").read_text())["train"]["learning_rate"] == point[
        "train.learning_rate"]
    assert json.loads((tmp_path / name / "eval_test.json").read_text())["step"] in (5, 10)
  assert set(sweep.run_sweep(_config(data_cache), POINTS, tmp_path).values()) == {"done (skipped)"}
  # More steps make the finished points unfinished again: they continue from their last checkpoint.
  assert set(sweep.run_sweep(_config(data_cache, 12), POINTS, tmp_path, dry_run=True).values()) == {"partial"}


def test_points_run_two_at_a_time(data_cache, tmp_path):
  config = tiny_listops_config(data_cache, num_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  outcome = sweep.run_sweep(config, POINTS, tmp_path, parallel=2)
  assert all(result.startswith("test accuracy ") for result in outcome.values()), outcome
  assert all((tmp_path / name / "eval_test.json").exists() for name in NAMES)


def test_point_names_and_override_errors():
  assert sweep.point_name({"train.learning_rate": 0.05, "train.warmup_steps": 4000}) == (
      "learning_rate=0.05,warmup_steps=4000")
  assert sweep.point_name({"model.attention.name": "performer"}) == "name=performer"
  config = tiny_listops_config("/tmp/unused")
  assert sweep.apply_overrides(config, {"model.num_layers": 3}).model.num_layers == 3
  assert config.model.num_layers == 1  # a copy
  with pytest.raises(ValueError, match="sweep key 'train.lr'.*valid:.*learning_rate"):
    sweep.apply_overrides(config, {"train.lr": 1.0})


def test_command_line_lists_a_configs_sweep(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), "--config=configs/lra/text.py:runlocal",
                         f"--workdir={tmp_path}", "--dry_run", "--config.train.num_steps=7"],
                        capture_output=True, text=True, check=False, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert lines == [f"{sweep.point_name(p)}: new" for p in text_config.get_sweep("runlocal")]
  assert len(lines) == 6 and lines[0].startswith("learning_rate=0.0005,warmup_steps=")
