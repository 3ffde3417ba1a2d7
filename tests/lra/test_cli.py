"""User errors end in one line `error: ...` and exit status 2 (train.py, eval.py, lra.cli.run); bugs keep their
traceback."""

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lra import cli
from tests.conftest import python_path

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(script, *args, timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": python_path()}
  env.pop(cli.TRACEBACK_ENV, None)
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def test_train_py_bad_config_values_are_one_line_and_exit_2(tmp_path):
  proc = _run("train.py", "--config=configs/lra/listops.py:runlocal", f"--workdir={tmp_path / 'w'}",
              "--config.train.num_steps=-5", "--config.train.learning_rate=-1", "--config.model.dropout_rate=1.5")
  assert proc.returncode == 2, proc.stderr[-3000:]
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith("error: invalid config: ")
  for fragment in ("config.train.num_steps=-5", "config.train.learning_rate=-1.0", "config.model.dropout_rate=1.5"):
    assert fragment in line
  assert not (tmp_path / "w").exists()


def test_train_py_flag_errors_are_one_line_and_exit_2(tmp_path):
  proc = _run("train.py", "--config=configs/lra/listops.py:runlocal", f"--workdir={tmp_path}",
              "--config.train.num_stepz=3")
  assert proc.returncode == 2, proc.stderr[-3000:]
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith("error: ") and "num_stepz" in line and "num_steps" in line


def test_eval_py_without_a_run_is_one_line_and_exit_2(tmp_path):
  proc = _run("eval.py", f"--workdir={tmp_path / 'nothing'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith("error: ") and "config.json not found" in line


class _Picky(nn.Module):
  @nn.compact
  def __call__(self, x):
    if x.shape[-1] != 3:
      raise ValueError(f"features={x.shape[-1]} must be 3")
    return nn.Dense(3)(x)


def _main_with_module_init_error(argv):
  del argv
  jax.jit(lambda: _Picky().init(jax.random.key(0), jnp.ones((1, 4))))()


def test_errors_inside_jitted_module_init_are_unwrapped_to_one_line(capsys):
  with pytest.raises(SystemExit) as info:
    cli.run(_main_with_module_init_error, argv=["prog"])
  assert info.value.code == cli.EXIT_USER_ERROR
  assert capsys.readouterr().err == "error: features=4 must be 3\n"


def test_a_wrapped_user_error_is_found_through_its_cause(capsys):
  def main(argv):
    try:
      raise FileNotFoundError("data/listops/train.tsv not found; run scripts/make_listops.py")
    except FileNotFoundError as e:
      raise RuntimeError("while loading") from e
  with pytest.raises(SystemExit) as info:
    cli.run(main, argv=["prog"])
  assert info.value.code == 2
  assert capsys.readouterr().err == "error: data/listops/train.tsv not found; run scripts/make_listops.py\n"


def test_bugs_keep_their_traceback():
  def main(argv):
    return argv.no_such_attribute
  with pytest.raises(AttributeError, match="no_such_attribute"):
    cli.run(main, argv=["prog"])


def test_traceback_on_request(monkeypatch):
  monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
  def main(argv):
    raise cli.UserError("bad")
  with pytest.raises(cli.UserError, match="bad"):
    cli.run(main, argv=["prog"])
