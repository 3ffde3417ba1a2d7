"""scripts/sweep.py --launcher=ray on a local Ray instance (2 CPUs, no dashboard): a tiny point trains as a Ray task
and a second one fails, both at once; the failure is reported with its last error line, the other finishes, the same
table is written. (Variants side by side through the runner: tests/scripts/test_sweep.py, the same code for every
launcher.) Ray is the `ray` extra, installed by .ci/run."""

import csv
import json
import pathlib
import sys

import ray

from tests.conftest import load_script, tiny_listops_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sweep = load_script("sweep", "sweep")


def test_ray_launcher_runs_points_and_reports_failures(data_cache, tmp_path, capsys):
  # The compiled steps are those of test_sweep.py's tiny runs (the persistent compilation cache may serve them).
  config = tiny_listops_config(data_cache, num_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  points = [{"model.attention.name": "linear"},
            {"model.attention.name": "linear", "data.data_dir": str(tmp_path / "missing")}]
  assert not ray.is_initialized()
  outcome = sweep.run_sweep(config, points, tmp_path / "sweep", launcher="ray", ray_num_cpus=2,
                            ray_resources='{"CPU": 1}')
  assert not ray.is_initialized()  # the local instance it started is shut down
  good = ["attention=linear"]
  bad = next(name for name in outcome if name not in good)
  assert all(outcome[n].startswith("test accuracy ") for n in good), outcome
  assert outcome[bad].startswith("failed: FileNotFoundError") and str(tmp_path / "missing") in outcome[bad]
  with open(tmp_path / "sweep" / "results.csv") as f:
    rows = {r["point"]: r for r in csv.DictReader(f)}
  assert list(rows) == list(outcome) and rows[bad]["status"] == outcome[bad]
  for name in good:
    assert rows[name]["status"] == "done" and 0.0 <= float(rows[name]["test accuracy"]) <= 1.0
    assert int(rows[name]["parameters"]) > 1000 and float(rows[name]["steps/s"]) > 0
    assert json.loads((tmp_path / "sweep" / name / "config.json").read_text())["model"]["attention"]["name"] == (
        name.split("=")[1])
  assert "| attention=linear | linear | done |" in (tmp_path / "sweep" / "results.md").read_text()
  captured = capsys.readouterr()
  assert f"{bad}: FAILED: FileNotFoundError" in captured.out + captured.err


def test_ray_options_from_flags():
  assert sweep.ray_options('{"GPU": 1}', None) == {"num_cpus": 1, "num_gpus": 1}
  assert sweep.ray_options('{"CPU": 4, "TPU": 4}', None) == {"num_cpus": 4, "resources": {"TPU": 4}}
  assert sweep.ray_options(None, 0.5) == {"num_cpus": 1, "num_gpus": 0.5}
  for text, message in [("{GPU: 1}", "is not JSON"), ('{"GPU": -1}', "non-negative")]:
    try:
      sweep.ray_options(text, None)
    except ValueError as e:
      assert message in str(e)
    else:
      raise AssertionError(f"{text} was accepted")
