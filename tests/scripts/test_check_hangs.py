"""scripts/check_hangs.py: a run past its time limit is a hang (killed, counted, exit status 1); flags are checked.

The real check (every variant's compiled step in many fresh processes) takes minutes and is run by hand."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "check_hangs.py"


@pytest.fixture(scope="module")
def check_hangs():
  spec = importlib.util.spec_from_file_location("check_hangs", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_run_past_the_time_limit_is_a_hang(check_hangs, capsys):
  # No step compiles in 0.3 s: the run must be reported as a hang and the process group killed.
  assert check_hangs.main(["--attention=linear", "--runs=2", "--timeout=0.3", "--jobs=2"]) == 1
  out = capsys.readouterr().out
  assert "linear: run 2/2 hang" in out
  assert "| linear             |  0 |    2 |     0 |" in out


def test_bad_flags(check_hangs, capsys):
  assert check_hangs.main(["--attention=nope"]) == 2
  assert "unknown attention variant(s) ['nope']" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    check_hangs.main(["--runs=0"])


def test_custom_call_targets_from_hlo_and_stablehlo(check_hangs):
  hlo = ('%qr = f32[2,4,4] custom-call(%p), custom_call_target="lapack_sgeqrf_ffi"\n'
         '  %0 = stablehlo.custom_call @lapack_sorgqr_ffi(%arg0)\n custom_call_target="lapack_sgeqrf_ffi"')
  assert check_hangs.custom_call_targets(hlo) == ["lapack_sgeqrf_ffi", "lapack_sorgqr_ffi"]
  assert check_hangs.custom_call_targets("HloModule m\n%add = f32[] add(%a, %b)") == []
