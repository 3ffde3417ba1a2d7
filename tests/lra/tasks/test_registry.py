"""A task registered from outside the package: the README's "Add a task" example, taken from the README text,
trains a step through train.py (`TASK_PLUGINS` names its module) and its batch layout is the one its data has.
Also: `dummy_batch` of every built-in task is derived from its `input_spec`."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import common
from lra import tasks
from lra.tasks import registry

ROOT = pathlib.Path(__file__).resolve().parents[3]
CONFIGS = {"listops": "lra/listops", "text": "lra/text", "retrieval": "lra/retrieval", "image": "lra/image",
           "pathfinder": "lra/pathfinder", "pathx": "lra/pathx", "mqar": "mqar"}


def readme_example(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes the README's "Add a task" code blocks that start with `# <file>.py` into `directory`."""
  text = (ROOT / "README.md").read_text()
  section = text.split("### Add a task\n", 1)[1].split("\n### ", 1)[0]
  files = {}
  for block in re.findall(r"```python\n(.*?)```", section, re.DOTALL):
    name = re.match(r"# (\w+\.py)\n", block).group(1)
    files[name] = directory / name
    files[name].write_text(block)
  assert set(files) == {"my_task.py", "my_task_config.py"}, files
  return files


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> dict[str, pathlib.Path]:
  return readme_example(tmp_path_factory.mktemp("plugin"))


def test_the_readme_task_trains_a_step_through_train_py(example, tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", registry.PLUGINS_ENV: "my_task",
         "PYTHONPATH": os.pathsep.join([str(ROOT), str(example["my_task.py"].parent)])}
  overrides = ["--config.train.num_steps=1", "--config.train.warmup_steps=0", "--config.train.eval_every_steps=1",
               "--config.train.batch_size=8", "--config.train.eval_batch_size=8", "--config.train.num_eval_batches=1",
               "--config.data.num_examples=16", "--config.model.num_layers=1",
               f"--config.data.cache_dir={tmp_path / 'cache'}"]
  proc = subprocess.run([sys.executable, "train.py", f"--config={example['my_task_config.py']}",
                         f"--workdir={workdir}", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((workdir / "config.json").read_text())["task"] == "majority"
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  by_split = {r["split"]: r for r in records if r["step"] == 1}
  assert np.isfinite(by_split["train"]["loss"]), records
  assert 0.0 <= by_split["validation"]["accuracy"] <= 1.0, records


def test_the_readme_task_batch_layout_matches_its_data(example, monkeypatch):
  monkeypatch.syspath_prepend(str(example["my_task.py"].parent))
  if "majority" not in tasks.names():
    assert registry.import_plugins("my_task") == ["my_task"]
  config = common.load_config_file(str(example["my_task_config.py"]))
  config.data.num_examples = 32
  task = tasks.build(config)
  assert isinstance(task, tasks.ClassificationTask) and task.name == "majority"
  data = task.dataset("train").arrays
  assert task.dataset("train") is task.dataset("train")  # built once
  batch = task.dummy_batch(3)
  assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == {k: (v.shape[1:], v.dtype) for k, v in data.items()}
  assert batch["mask"].all() and not batch["inputs"].any()
  assert 0 < data["targets"].mean() < 1 and not data["mask"].all()  # both classes, some padding
  with pytest.raises(ValueError, match="unknown majority split 'dev'; valid choices"):
    task.dataset("dev")


def test_a_plugin_module_that_does_not_import_is_named():
  with pytest.raises(ValueError, match="TASK_PLUGINS names module 'no_such_task_module', which cannot be imported"):
    registry.import_plugins(" no_such_task_module ,")
  with pytest.raises(ValueError, match="unknown task 'nope'.*TASK_PLUGINS"):
    tasks.get("nope")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dummy_batch_is_derived_from_the_input_spec(name):
  config = common.load_config_file(str(ROOT / "configs" / f"{CONFIGS[name]}.py") + ":runlocal")
  task = tasks.build(config)
  spec = task.input_spec()
  batch = task.dummy_batch(2)
  assert set(batch) == set(spec) and "targets" in spec and ("inputs" in spec or {"inputs1", "inputs2"} <= set(spec))
  for key, value in batch.items():
    assert value.shape == (2, *spec[key].shape) and value.dtype == spec[key].dtype, key
    assert value.all() if value.dtype == np.bool_ else not value.any(), key
