"""scripts/check_hangs.py: a run past its time limit is a hang (killed, counted, exit status 1); flags are checked.

The real check (every variant's compiled step in many fresh processes) takes minutes and is run by hand."""

import os
import pathlib
import subprocess
import sys

import pytest

from lra import cli
from tests.conftest import load_script, python_path

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def check_hangs():
  return load_script("check_hangs", "check_hangs")  # registered: its dataclass needs its module


def test_a_run_past_the_time_limit_is_a_hang(check_hangs, capsys):
  # No step compiles in 0.3 s: the run must be reported as a hang and the process group killed.
  assert check_hangs.check(["linear"], runs=2, timeout=0.3, jobs=2, run=check_hangs.Run()) == 1
  out = capsys.readouterr().out
  assert "linear: run 2/2 hang" in out
  assert "| linear             |  0 |    2 |     0 |" in out


def test_bad_flags(check_hangs):
  with pytest.raises(cli.UserError, match=r"unknown attention variant\(s\) \['nope'\] in --attention; valid: "):
    check_hangs.variants(["linear", "nope"])
  assert check_hangs.variants([]) and check_hangs.variants([" linear "]) == ["linear"]
  # A flag out of range stops the script before anything runs: one `error:` line, exit status 2 (lra.cli.run).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": python_path()}
  env.pop(cli.TRACEBACK_ENV, None)
  proc = subprocess.run([sys.executable, "scripts/check_hangs.py", "--runs=0"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith("error: ") and "runs" in line, line


def test_worker_command_line_round_trips_the_run(check_hangs):
  run = check_hangs.Run(length=64, num_layers=1, batch_size=2, steps=1, cpus=1, performer_features="lapack_qr")
  assert run.command_line() == ["--length=64", "--num_layers=1", "--batch_size=2", "--steps=1", "--cpus=1",
                                "--performer_features=lapack_qr"]


def test_custom_call_targets_from_hlo_and_stablehlo(check_hangs):
  hlo = ('%qr = f32[2,4,4] custom-call(%p), custom_call_target="lapack_sgeqrf_ffi"\n'
         '  %0 = stablehlo.custom_call @lapack_sorgqr_ffi(%arg0)\n custom_call_target="lapack_sgeqrf_ffi"')
  assert check_hangs.custom_call_targets(hlo) == ["lapack_sgeqrf_ffi", "lapack_sorgqr_ffi"]
  assert check_hangs.custom_call_targets("HloModule m\n%add = f32[] add(%a, %b)") == []
