"""Attention plugins (`ATTENTION_PLUGINS`, attention/plugins.py) reach every entry point: the README's "Add an
attention variant" text trains through `train.py` from a plugin module, and a plugin variant (a plain subclass of
softmax) passes the sequence-parallel suite, whose 8-device subprocess imports the plugins too."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from attention import plugins

ROOT = pathlib.Path(__file__).resolve().parents[2]

SOFTMAX_SUBCLASS = '''
import attention
from attention.softmax import SoftmaxAttention


@attention.register("plugin_softmax")
class PluginSoftmax(SoftmaxAttention):
  """A correct variant: softmax under another name, registered from outside the package."""
'''


def readme_variants(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes the README's "Add an attention variant" code blocks that start with `# <file>.py` into `directory`."""
  section = (ROOT / "README.md").read_text().split("### Add an attention variant\n", 1)[1].split("\n### ", 1)[0]
  files = {}
  for block in re.findall(r"```python\n(.*?)```", section, re.DOTALL):
    name = re.match(r"# (\w+\.py)\n", block).group(1)
    files[name] = directory / name
    files[name].write_text(block)
  assert set(files) == {"my_attention.py", "my_nnx_attention.py"}, files
  return files


def plugin_env(directory: pathlib.Path, modules: str, **extra: str) -> dict[str, str]:
  """This process's environment with `modules` as ATTENTION_PLUGINS, found on PYTHONPATH beside the project."""
  python_path = os.pathsep.join(filter(None, [str(directory), str(ROOT), os.environ.get("PYTHONPATH")]))
  return {**os.environ, "JAX_PLATFORMS": "cpu", plugins.PLUGINS_ENV: modules, "PYTHONPATH": python_path, **extra}


def train_readme_variant(directory: pathlib.Path, modules: str, name: str, workdir: pathlib.Path,
                         cache: pathlib.Path, *options: str) -> list[dict]:
  """Two steps of a one-layer runlocal ListOps model with attention `name`, through train.py in a fresh process
  with `modules` as ATTENTION_PLUGINS; the metrics it wrote."""
  overrides = ["--config.train.num_steps=2", "--config.train.warmup_steps=0", "--config.train.eval_every_steps=2",
               "--config.train.batch_size=4", "--config.train.eval_batch_size=4",
               "--config.train.num_eval_batches=1", "--config.model.num_layers=1", "--config.model.emb_dim=16",
               "--config.model.qkv_dim=16", "--config.model.mlp_dim=16", "--config.model.num_heads=2",
               "--config.data.max_length=32", "--config.data.generate.num_train=32",
               "--config.data.generate.num_val=8", "--config.data.generate.num_test=8",
               "--config.data.generate.max_length=32", f"--config.data.cache_dir={cache}", *options]
  proc = subprocess.run([sys.executable, "train.py", f"--config=configs/lra/listops.py:runlocal,attention={name}",
                         f"--workdir={workdir}", *overrides], cwd=ROOT, env=plugin_env(directory, modules),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_the_readme_variants_train_through_train_py(tmp_path):
  """Both README modules named in ATTENTION_PLUGINS; train.py trains the NNX one, its option set on the command
  line (the linen one passes the contract suite with it: tests/attention/test_nnx.py)."""
  readme_variants(tmp_path)
  records = train_readme_variant(tmp_path, "my_attention,my_nnx_attention", "my_nnx_attention", tmp_path / "run",
                                 tmp_path / "cache", "--config.model.attention.temperature=2.0")
  by_split = {r["split"]: r for r in records if r["step"] == 2}
  assert np.isfinite(by_split["train"]["loss"]) and 0.0 <= by_split["validation"]["accuracy"] <= 1.0, records
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["attention"] == {"name": "my_nnx_attention", "temperature": 2.0}, saved["model"]


def test_a_plugin_variant_passes_the_sequence_parallel_suite(tmp_path):
  """Issue 32 item 6: the sequence-parallel suite's 8-device subprocess knows a plugin variant (it imports
  `attention`, which imports ATTENTION_PLUGINS, with the plugin's folder still on PYTHONPATH)."""
  (tmp_path / "softmax_subclass_plugin.py").write_text(SOFTMAX_SUBCLASS)
  env = plugin_env(tmp_path, "softmax_subclass_plugin", SEQPAR_NAMES="plugin_softmax")
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rA", "--tb=short",
             "tests/attention/test_sequence_parallel.py", "-k",
             "test_sequence_sharded_layer_matches_unsharded and plugin_softmax"]
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output[-3000:]
  assert "PASSED tests/attention/test_sequence_parallel.py::test_sequence_sharded_layer_matches_unsharded" \
         "[plugin_softmax]" in output, output[-3000:]


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path, monkeypatch):
  with pytest.raises(ValueError) as e:
    plugins.import_plugins("attention.softmax, no_such_plugin_module")
  assert str(e.value) == ("ATTENTION_PLUGINS names module 'no_such_plugin_module', which cannot be imported (No "
                          "module named 'no_such_plugin_module'); fix the name in ATTENTION_PLUGINS or add its "
                          "folder to PYTHONPATH")
  # A plugin found but failing on its own import: the fix is in the plugin, not the name.
  (tmp_path / "plugin_with_a_bad_import.py").write_text("import no_such_dependency_module\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ValueError, match=r"^ATTENTION_PLUGINS names module 'plugin_with_a_bad_import', which cannot be "
                                       r"imported \(No module named 'no_such_dependency_module'\); fix that import"):
    plugins.import_plugins("plugin_with_a_bad_import")
  assert plugins.import_plugins(" attention.softmax ,, ") == ["attention.softmax"]


def test_task_plugins_use_the_same_loader():
  from lra.tasks import registry  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"^TASK_PLUGINS names module 'no_such_task_plugin', which cannot be imported "
                                       r"\(No module named 'no_such_task_plugin'\); fix the name in TASK_PLUGINS"):
    registry.import_plugins("no_such_task_plugin")


def test_an_unknown_variant_names_the_plugin_variable():
  import attention  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"unknown attention variant 'my_attention'; valid choices: .*softmax.* \(a "
                                       r"variant defined outside the package is registered by naming its module in "
                                       r"ATTENTION_PLUGINS\)$"):
    attention.build("my_attention")
