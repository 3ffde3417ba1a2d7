"""Another installed package named like one of this project's (huggingface `kernels`, a Keras `attention`) is refused
with one line naming it and the fix (attention/packages.py), not a confusing error far away."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from attention import packages

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _import_with_foreign(tmp_path: pathlib.Path, foreign: str, statement: str) -> subprocess.CompletedProcess:
  """Runs `statement` with a fake foreign package `foreign` first on sys.path (the working directory, then
  PYTHONPATH), this project after it: how a site-packages copy shadows an editable install."""
  (tmp_path / foreign).mkdir()
  (tmp_path / foreign / "__init__.py").write_text('"""Another project\'s package of the same name."""\n')
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", statement], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120, check=False)


@pytest.mark.parametrize("foreign,statement", [("kernels", "import attention"), ("kernels", "import lra"),
                                               ("attention", "from lra import cli"), ("configs", "import lra")])
def test_a_foreign_package_of_the_same_name_is_one_line(tmp_path, foreign, statement):
  proc = _import_with_foreign(tmp_path, foreign, statement)
  assert proc.returncode == 1, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last == (
      f"ImportError: the package {foreign!r} imported here is not this project's: "
      f"{(tmp_path / foreign / '__init__.py').resolve()} (this project's is {ROOT / foreign}); another installed "
      f"package uses the import name {foreign!r} (e.g. huggingface 'kernels', Keras 'attention'): install this "
      f"project in its own virtual environment (python -m venv .venv && .venv/bin/pip install -e {ROOT}), or "
      f"uninstall the other package there"), proc.stderr[-2000:]


def test_this_projects_packages_pass():
  packages.check()  # the suite's own imports resolve here
  assert packages.location("kernels") == ROOT / "kernels" / "__init__.py"
  assert packages.location("no_such_package_anywhere") is None


def test_a_package_overwritten_in_place_is_one_line(tmp_path):
  """A non-editable install of another `kernels` into the same folder: the path is right, the marker is not."""
  (tmp_path / "kernels").mkdir()
  (tmp_path / "kernels" / "__init__.py").write_text('"""huggingface kernels, installed over ours."""\n')
  script = (f"import importlib.util, pathlib\n"
            f"spec = importlib.util.spec_from_file_location('checker', {str(ROOT / 'attention' / 'packages.py')!r})\n"
            f"checker = importlib.util.module_from_spec(spec)\n"
            f"spec.loader.exec_module(checker)\n"
            f"checker.check(('kernels',), root=pathlib.Path({str(tmp_path)!r}))\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                        check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"ImportError: the package 'kernels' at {(tmp_path / 'kernels' / '__init__.py').resolve()} is not this "
      f"project's: its __init__.py lacks the line {packages.MARKER_LINE}, so another package installed into the same "
      f"folder replaced it (e.g. huggingface 'kernels', Keras 'attention'): install this project in its own virtual "
      f"environment (python -m venv .venv && .venv/bin/pip install -e {tmp_path}), or uninstall the other package "
      f"there"), proc.stderr[-2000:]
