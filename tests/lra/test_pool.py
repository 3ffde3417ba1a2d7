"""lra/pool.py, the worker pool of benchmark.py and sweep.py: every item gets one outcome whatever its process does
(reports, raises, dies, hangs), a dead process is replaced for the remaining items, a hang is killed at the time
limit and the job's later items are skipped, slots get their own environment, Python functions run as jobs."""

import os
import pathlib
import sys
import textwrap

import pytest

from lra import pool
from tests.conftest import python_path

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": python_path()}

# A worker: reports each item given on its command line; "die" exits abruptly, "hang" sleeps, "fail" reports an
# error of its own, "slot" reports the SLOT variable of its environment.
WORKER = textwrap.dedent("""
    import os, sys, time
    from lra import pool
    pool.emit_info({"pid": os.getpid()})
    for item in sys.argv[1:]:
      if item == "die":
        print("dying on purpose", file=sys.stderr, flush=True)
        os._exit(3)
      if item == "hang":
        time.sleep(600)
      if item == "fail":
        pool.emit({"status": "error", "error": "failed on purpose"})
        continue
      pool.emit({"item": item, "pid": os.getpid(), "slot": os.environ.get("SLOT")})
""")


@pytest.fixture
def worker(tmp_path):
  path = tmp_path / "worker.py"
  path.write_text(WORKER)
  return lambda items: [sys.executable, str(path), *items]


def _by_item(outcomes):
  return {o.item: o for o in outcomes}


def test_a_dead_process_is_an_error_and_a_new_one_takes_the_rest(worker, tmp_path):
  infos = []
  outcomes = pool.run([pool.Job("j", ["a", "die", "b", "fail", "c"], worker, env=ENV)], log_dir=tmp_path / "logs",
                      timeout=60, on_info=infos.append)
  got = _by_item(outcomes)
  assert [o.item for o in outcomes] == ["a", "die", "b", "fail", "c"]
  assert got["a"].status == "ok" and got["a"].record["item"] == "a"
  assert got["die"].status == "error" and got["die"].error == "dying on purpose"  # the last line of its log
  assert got["fail"].status == "error" and got["fail"].error == "failed on purpose"
  # The items after the death ran in a second process, with its own log.
  assert got["b"].record["pid"] == got["c"].record["pid"] != got["a"].record["pid"]
  assert len({i["pid"] for i in infos}) == 2
  assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["j.0.log", "j.1.log"]


def test_a_hang_times_out_and_the_later_items_are_skipped(worker, tmp_path):
  # 3 s: the worker's first result comes within it (a python start without jax), the hang (600 s) never does.
  outcomes = pool.run([pool.Job("j", ["a", "hang", "b"], worker, env=ENV, label="item {}")],
                      log_dir=tmp_path, timeout=3)
  got = _by_item(outcomes)
  assert got["a"].status == "ok"
  assert got["hang"].status == "timeout" and "3 s" in got["hang"].error
  assert got["b"].status == "skipped" and got["b"].error == "timeout at item hang"


def test_process_per_item_and_slots(worker, tmp_path):
  jobs = [pool.Job(f"j{i}", [str(i), f"{i}x"], worker, process_per_item=True, env=ENV) for i in range(3)]
  outcomes = pool.run(jobs, log_dir=tmp_path, timeout=60, parallel=2, slot_env=lambda i: {"SLOT": str(i)})
  assert len(outcomes) == 6 and all(o.status == "ok" for o in outcomes)
  assert len({o.record["pid"] for o in outcomes}) == 6  # a fresh process for every item
  assert {o.record["slot"] for o in outcomes} == {"0", "1"}


def _square(x):
  if x < 0:
    raise ValueError(f"x={x} must be >= 0")
  return {"square": x * x, "pid": os.getpid()}


def test_python_functions_as_jobs(tmp_path):
  job = pool.python_job("squares", _square, [(3,), (-1,), (4,)], work_dir=tmp_path / "calls")
  got = _by_item(pool.run([job], log_dir=tmp_path, timeout=120))
  assert got[0].record["square"] == 9 and got[2].record["square"] == 16
  assert got[0].record["pid"] != os.getpid()
  assert got[1].status == "error" and got[1].error == "ValueError: x=-1 must be >= 0"
  assert "Traceback" in pathlib.Path(got[1].log).read_text()  # the whole story in the log


def test_bad_settings_are_refused(worker, tmp_path):
  with pytest.raises(ValueError, match="parallel=0"):
    pool.run([], log_dir=tmp_path, parallel=0)
  with pytest.raises(ValueError, match="timeout=0"):
    pool.run([], log_dir=tmp_path, timeout=0)
