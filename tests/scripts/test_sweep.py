"""scripts/sweep.py, the one runner: one workdir per point, train + test evaluation, finished points skipped,
interrupted points resumed, points N at a time, --axis grids over any key (attention variants included), the results
table, and bad axes refused before anything runs."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs.lra import text as text_config
from lra.tasks import pipeline
from lra.training.metric_writers import read_metrics
from tests.conftest import load_script, python_path, tiny_listops_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Importable by name, as the point processes of a parallel sweep import it (they start with this sys.path).
sys.path.insert(0, str(ROOT / "scripts"))
sweep = load_script("sweep", "sweep")
compare = load_script("compare", "compare")

# Points that differ in the seed only: every point compiles the same programs as tiny_listops_config's other runs in
# this session (the learning rate is a constant of the compiled step; the seed's key is an argument), so the
# persistent compilation cache serves them after the first. Any dotted key takes the same path through the runner.
POINTS = [{"seed": 1}, {"seed": 2}]
NAMES = ["seed=1", "seed=2"]


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
    assert json.loads((tmp_path / name / "config.json").read_text())["seed"] == point["seed"]
    assert json.loads((tmp_path / name / "eval_test.json").read_text())["step"] in (5, 10)
  assert set(sweep.run_sweep(_config(data_cache), POINTS, tmp_path).values()) == {"done (skipped)"}
  # The table has both points, the skipped one included.
  with open(tmp_path / "results.csv") as f:
    assert [r["seed"] for r in csv.DictReader(f)] == ["1", "2"]
  # More steps make the finished points unfinished again: they continue from their last checkpoint.
  assert set(sweep.run_sweep(_config(data_cache, 12), POINTS, tmp_path, dry_run=True).values()) == {"partial"}


def _check_results(root, outcome, names):
  """The table: one row per point with its override, status, validation/test metrics, parameters and steps/s."""
  with open(root / "results.csv") as f:
    rows = {r["point"]: r for r in csv.DictReader(f)}
  assert list(rows) == list(outcome)
  for name in names:
    row = rows[name]
    assert row["status"] == "done" and outcome[name].startswith("test accuracy ")
    assert row["attention"] == name.split("=")[1]
    assert 0.0 <= float(row["test accuracy"]) <= 1.0 and 0.0 <= float(row["validation accuracy"]) <= 1.0
    assert int(row["parameters"]) > 1000 and float(row["steps/s"]) > 0
    recorded = json.loads((root / name / "config.json").read_text())["model"]
    assert recorded["attention"]["name"] == name.split("=")[1] and recorded["resolved_attention"][0]  # options that ran
  table = (root / "results.md").read_text()
  assert table.startswith("| point | attention | status |") and table.count("\n") == 2 + len(rows)
  return rows


def test_variants_by_axis_with_a_failing_point(data_cache, tmp_path):
  config = tiny_listops_config(data_cache, num_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  # A point whose data is missing fails; the others run and the table reports it with its last error line.
  points = [{}, {"data.data_dir": str(tmp_path / "missing")}]
  outcome = sweep.run_sweep(config, points, tmp_path, axes={"model.attention.name": ["softmax", "linear"]})
  names = ["attention=softmax", "attention=linear"]
  rows = _check_results(tmp_path, outcome, names)
  failed = [name for name in outcome if name not in names]
  assert len(failed) == 2 and all(outcome[n].startswith("failed: FileNotFoundError") for n in failed), outcome
  assert all(rows[n]["status"] == outcome[n] and str(tmp_path / "missing") in rows[n]["status"] for n in failed)
  # Same parameter shapes: linear attention reuses softmax's projections.
  assert rows[names[0]]["parameters"] == rows[names[1]]["parameters"]


def test_points_run_two_at_a_time(data_cache, tmp_path):
  # Each point in its own process of lra/pool.py; the second fails (its data is missing) in its process, and the
  # runner reports it with the last line of that process's log (a failure costs no training here).
  config = tiny_listops_config(data_cache, num_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  points = [POINTS[0], {**POINTS[1], "data.data_dir": str(tmp_path / "missing")}]
  outcome = sweep.run_sweep(config, points, tmp_path, parallel=2)
  good, bad = outcome
  assert outcome[good].startswith("test accuracy ") and (tmp_path / good / "eval_test.json").exists(), outcome
  assert outcome[bad].startswith("failed: FileNotFoundError") and str(tmp_path / "missing") in outcome[bad], outcome
  assert (tmp_path / "logs" / f"{bad}.0.log").exists()


def test_point_names_axes_and_override_errors(data_cache):
  assert sweep.point_name({"train.learning_rate": 0.05, "train.warmup_steps": 4000}) == (
      "learning_rate=0.05,warmup_steps=4000")
  assert sweep.point_name({"model.attention.name": "performer", "model.attention.num_features": 64}) == (
      "attention=performer,num_features=64")
  assert sweep.parse_axes(["model.attention.offsets=(1,2),(4,8)", "train.learning_rate=1e-3, 2e-3"]) == {
      "model.attention.offsets": ["(1,2)", "(4,8)"], "train.learning_rate": ["1e-3", "2e-3"]}
  config = tiny_listops_config(data_cache)
  points = sweep.build_points(config, [], {"model.attention.name": ["grassmann"],
                                           "model.attention.offsets": ["(1,2)"], "train.learning_rate": ["1e-3"]})
  (overrides, point_config), = points.values()
  assert overrides == {"model.attention.name": "grassmann", "model.attention.offsets": (1, 2),
                       "train.learning_rate": 0.001}
  # The point's config holds what the axes set; the registry default of grassmann's other options resolves per layer.
  from lra.training import config_checks  # pylint: disable=import-outside-toplevel
  assert config_checks.resolved_layers(point_config)[0]["reduced_dim"] == 32
  assert config.model.attention.name == "softmax"
  bad = [({"train.lr": ["1"]}, "--axis train.lr: train has no 'lr'; valid keys:.*learning_rate"),
         ({"train.learning_rate": ["fast"]}, "--axis train.learning_rate: could not parse 'fast'"),
         ({"model.attention.name": ["nope"]}, "--axis model.attention.name=nope: unknown attention variant 'nope'"),
         ({"model.attention.name": ["linear"], "model.attention.num_features": ["8"]},
          "--axis model.attention.num_features: model.attention has no 'num_features'"),
         ({"train.num_steps": ["0"]}, "invalid config.*train.num_steps")]
  for axes, message in bad:
    with pytest.raises(ValueError, match=message):
      sweep.build_points(config, [], axes)
  for text, message in [("train.learning_rate", "expected dotted.key=value1,value2"), ("x=1,", "empty value")]:
    with pytest.raises(ValueError, match=message):
      sweep.parse_axes([text])


def _run_cli(args, tmp_path, script="sweep.py"):
  return subprocess.run([sys.executable, str(ROOT / "scripts" / script), f"--workdir={tmp_path / 'w'}", *args],
                        capture_output=True, text=True, check=False, cwd=ROOT, timeout=300,
                        env={**os.environ, "PYTHONPATH": python_path(), "JAX_PLATFORMS": "cpu"})


def test_command_line_lists_a_configs_sweep_and_refuses_bad_axes(tmp_path):
  # --axis crossed with the config's get_sweep() (--with_config_sweep): every point listed by --dry_run.
  proc = _run_cli(["--config=configs/lra/text.py:runlocal", "--dry_run", "--axis=model.attention.name=softmax,linear",
                   "--with_config_sweep", "--config.train.num_steps=700"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  config_sweep = text_config.get_sweep("runlocal")
  assert len(config_sweep) == 6 and sweep.load_sweep(f"{ROOT}/configs/lra/text.py:runlocal") == config_sweep
  assert proc.stdout.strip().splitlines() == [
      f"{sweep.point_name({**p, 'model.attention.name': name})}: new" for p in config_sweep
      for name in ("softmax", "linear")]
  # Without --axis the config's get_sweep() alone (in process: the same function main calls).
  listed = sweep.run_sweep(text_config.get_config("runlocal"), config_sweep, tmp_path / "w", dry_run=True)
  assert list(listed) == [sweep.point_name(p) for p in config_sweep] and set(listed.values()) == {"new"}
  assert next(iter(listed)).startswith("learning_rate=0.0005,warmup_steps=")
  # compare.py --attention is an alias of the axis.
  assert compare.translate(["--attention=softmax,linear", "--attention", "based", "--dry_run"]) == [
      "--axis=model.attention.name=softmax,linear", "--axis=model.attention.name=based", "--dry_run"]
  # A bad axis stops the sweep before anything runs (no workdir), naming the axis: in process, run_sweep with the axes
  # main parses from the same flags (main prints a ValueError as its one `error:` line, exit status 2, as cli.run
  # does for every script: tests/lra/test_cli.py).
  axes = sweep.parse_axes(["model.attention.name=softmax,linear", "train.learning_rate=1e-3,fast"])
  with pytest.raises(ValueError, match=r"^--axis train.learning_rate: could not parse 'fast'"):
    sweep.run_sweep(text_config.get_config("runlocal"), [], tmp_path / "bad", axes=axes)
  assert not (tmp_path / "bad").exists()
