"""Script flags that take a count, a duration or a list of lengths refuse bad values in one line (exit status 2).

`scripts/lra_table.py --run --time_budget=-5 DIR` used to exit 0, printing the protocol's points as "new" having run
nothing. The flags are checked while they are parsed, so each case costs one interpreter start and the imports.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import python_path

ROOT = pathlib.Path(__file__).resolve().parents[2]

CASES = [
    # 0, the boundary: a check written as `>= 0` would pass -5 (the original bug's value) but not this.
    ("lra_table.py", ["--run", "--time_budget=0"], "--time_budget=0.0", "positive number of seconds"),
    ("benchmark_decode.py", ["--lengths=256,0"], "--lengths=", "positive integers"),
    ("generate.py", ["--workdir=x", "--prompt=a", "--num_tokens=0"], "--num_tokens=0", "positive integer"),
    ("make_listops.py", ["--max_args=1"], "--max_args=1", ">= 2"),
    ("check_multihost.py", ["--timeout=-1"], "--timeout=-1.0", "positive number of seconds"),
]


def _run_all(tmp_path):
  env = {**os.environ, "PYTHONPATH": python_path(), "JAX_PLATFORMS": "cpu"}
  procs = []
  for script, args, _, _ in CASES:
    extra = [str(tmp_path / "runs")] if script == "lra_table.py" else []
    if script == "make_listops.py":
      extra = [f"--output_dir={tmp_path / 'listops'}"]
    procs.append(subprocess.Popen([sys.executable, str(ROOT / "scripts" / script), *args, *extra], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      proc.kill()
      raise
    results.append((proc.returncode, out, err))
  return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return _run_all(tmp_path_factory.mktemp("flags"))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}{c[1][-1]}" for c in CASES])
def test_bad_flag_value_is_one_line_error(results, index):
  script, _, value, expected = CASES[index]
  returncode, stdout, stderr = results[index]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert returncode == 2, (script, returncode, stdout[-1000:], stderr[-2000:])
  assert len(errors) == 1 and value in errors[0] and expected in errors[0], stderr[-2000:]
  # Nothing ran: no table of "new" points was printed.
  assert "new" not in stdout
