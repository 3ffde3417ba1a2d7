"""The one pool of worker processes with time limits, shared by scripts/benchmark.py and scripts/sweep.py.

A job is a list of items (a benchmark variant's lengths, a sweep's one point) and a command line that works through
the items it is given in order, printing one result line per item (`emit`). The pool runs up to `parallel` jobs at
a time, each in its own process (stderr to `<log_dir>/<job>.<attempt>.log`), and turns whatever happens into one
`Outcome` per item, never into an exception of the caller:

- a result line: the item's record (`status` is the worker's own: "ok", or its error for that item);
- the process dies before reporting an item: that item is "error" with the last line of its log, and a new process
  goes on with the items after it;
- no result within `timeout` seconds of the previous one: the process is killed, the item is "timeout" and the job's
  later items are "skipped" (a benchmark's longer lengths would take longer still).

`python_job` runs a Python function per item in a fresh interpreter (`python -m lra.pool`), for callers whose work
is a function rather than a command line (a sweep point). Workers also send `info` lines (the device they measure),
passed to `on_info` as they come.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import importlib.util
import json
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULT_PREFIX = "LRA_POOL_RESULT "
INFO_PREFIX = "LRA_POOL_INFO "


def emit(record: Mapping[str, Any]) -> None:
  """Reports one item's result (a JSON-serializable mapping) from a worker process."""
  print(RESULT_PREFIX + json.dumps(record), flush=True)


def emit_info(record: Mapping[str, Any]) -> None:
  """Reports something that is not an item's result (the device a worker runs on)."""
  print(INFO_PREFIX + json.dumps(record), flush=True)


@dataclasses.dataclass
class Job:
  """`command(items)` is the argv of a process that reports `items` in order."""
  name: str
  items: Sequence[Any]
  command: Callable[[Sequence[Any]], Sequence[str]]
  process_per_item: bool = False  # a fresh process for every item, not only after a crash
  env: Mapping[str, str] | None = None  # added to this process's environment
  label: str = "{}"  # how messages name an item, e.g. "length {}"


@dataclasses.dataclass
class Outcome:
  job: str
  item: Any
  status: str  # the worker's status, or "error" (the process died), "timeout", "skipped"
  record: dict[str, Any] = dataclasses.field(default_factory=dict)
  error: str = ""
  log: str = ""  # the log of the process that ran the item


def last_log_line(path: str | Path) -> str:
  try:
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
  except OSError:
    return ""
  return lines[-1] if lines else ""


def _read_lines(stream, out: queue.Queue, on_info: Callable[[dict], None] | None) -> None:
  for line in stream:
    if line.startswith(RESULT_PREFIX):
      out.put(json.loads(line[len(RESULT_PREFIX):]))
    elif line.startswith(INFO_PREFIX) and on_info is not None:
      on_info(json.loads(line[len(INFO_PREFIX):]))
    else:  # the worker's own stdout: keep it visible
      sys.stdout.write(line)
  out.put(None)  # end of stream: the process exited


def _run_job(job: Job, *, log_dir: Path, timeout: float | None, slot_env: Mapping[str, str],
             finish: Callable[[Outcome], None], on_info: Callable[[dict], None] | None, cwd: str | None) -> None:
  remaining = list(job.items)
  attempt = 0
  env = {**os.environ, **(job.env or {}), **slot_env}
  while remaining:
    chunk = remaining[:1] if job.process_per_item else list(remaining)
    log_path = log_dir / f"{job.name}.{attempt}.log"
    attempt += 1
    with open(log_path, "w") as log:
      proc = subprocess.Popen(list(job.command(chunk)), stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                              text=True, cwd=cwd, env=env)
    results: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, results, on_info), daemon=True).start()
    while chunk:
      item = chunk[0]
      try:
        record = results.get(timeout=timeout)
      except queue.Empty:  # ran past its time limit
        proc.kill()
        proc.wait()
        finish(Outcome(job.name, item, "timeout", error=f"no result within {timeout:g} s", log=str(log_path)))
        for later in remaining[1:]:
          finish(Outcome(job.name, later, "skipped", error=f"timeout at {job.label.format(item)}", log=str(log_path)))
        return
      if record is None:  # died without reporting this item
        proc.wait()
        line = last_log_line(log_path) or f"worker exited with status {proc.returncode}"
        finish(Outcome(job.name, item, "error", error=line, log=str(log_path)))
        remaining.pop(0)
        break
      finish(Outcome(job.name, item, str(record.get("status", "ok")), record=record,
                     error=str(record.get("error", "")), log=str(log_path)))
      chunk.pop(0)
      remaining.pop(0)
    else:
      proc.wait()


def run(jobs: Sequence[Job], *, log_dir: str | Path, timeout: float | None = None, parallel: int = 1,
        slot_env: Callable[[int], Mapping[str, str]] | None = None,
        on_outcome: Callable[[Outcome], None] | None = None, on_info: Callable[[dict], None] | None = None,
        cwd: str | Path | None = None) -> list[Outcome]:
  """Runs `jobs`, `parallel` at a time; returns every item's outcome in the order they finished.

  `slot_env(i)` adds variables to the environment of the processes run in slot i (0 <= i < parallel), e.g. one GPU
  per slot; `on_outcome` is called (under a lock) as each item finishes.
  """
  if parallel < 1:
    raise ValueError(f"parallel={parallel} must be >= 1")
  if timeout is not None and timeout <= 0:
    raise ValueError(f"timeout={timeout} must be > 0 seconds (or None: no limit)")
  log_dir = Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  outcomes: list[Outcome] = []
  lock = threading.Lock()

  def finish(outcome: Outcome) -> None:
    with lock:
      outcomes.append(outcome)
      if on_outcome is not None:
        on_outcome(outcome)

  slots: queue.Queue = queue.Queue()
  for i in range(parallel):
    slots.put(i)

  def one(job: Job) -> None:
    slot = slots.get()
    try:
      _run_job(job, log_dir=log_dir, timeout=timeout, slot_env=dict(slot_env(slot)) if slot_env else {},
               finish=finish, on_info=on_info, cwd=str(cwd) if cwd else None)
    finally:
      slots.put(slot)

  with concurrent.futures.ThreadPoolExecutor(parallel) as threads:
    for future in [threads.submit(one, job) for job in jobs]:
      future.result()  # a bug in the pool itself (not in a worker) is the caller's to see
  return outcomes


# ----------------------------------------------------------------------------------------------------------------------
# Python functions as jobs.


def _function_ref(fn: Callable[..., Any]) -> tuple[str, str]:
  """(module name or file path, qualified name): how a fresh interpreter finds `fn` (a script run as __main__ is
  found by its file)."""
  module = sys.modules[fn.__module__]
  if fn.__module__ == "__main__" or not importlib.util.find_spec(fn.__module__):
    return str(Path(module.__file__).resolve()), fn.__qualname__
  return fn.__module__, fn.__qualname__


def python_job(name: str, fn: Callable[..., Mapping[str, Any]], calls: Sequence[tuple], *, work_dir: str | Path,
               env: Mapping[str, str] | None = None) -> Job:
  """A job whose items are `fn(*args)` for each `args` in `calls`, each result dict reported as that item's record
  (an exception is the item's "error" record, its traceback in the log). The arguments are pickled to `work_dir`."""
  work_dir = Path(work_dir)
  work_dir.mkdir(parents=True, exist_ok=True)
  ref = _function_ref(fn)
  paths = {}
  for i, args in enumerate(calls):
    fd, path = tempfile.mkstemp(prefix=f"{i}.", suffix=".pkl", dir=work_dir)
    with os.fdopen(fd, "wb") as f:
      # The path first, in a pickle of its own: the arguments may need modules only found on it.
      pickle.dump({"function": ref, "sys_path": list(sys.path)}, f)
      pickle.dump(tuple(args), f)
    paths[i] = path
  # `-m lra.pool` finds this package through PYTHONPATH whatever the working directory.
  root = str(Path(__file__).resolve().parents[1])
  python_path = os.pathsep.join(filter(None, [root, (env or {}).get("PYTHONPATH", os.environ.get("PYTHONPATH"))]))
  return Job(name, list(range(len(calls))),
             lambda items: [sys.executable, "-m", "lra.pool", *(paths[i] for i in items)],
             env={**(env or {}), "PYTHONPATH": python_path})


def _load_function(ref: tuple[str, str]) -> Callable[..., Any]:
  where, qualname = ref
  if where.endswith(".py"):
    spec = importlib.util.spec_from_file_location(Path(where).stem, where)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
  else:
    module = importlib.import_module(where)
  target: Any = module
  for part in qualname.split("."):
    target = getattr(target, part)
  return target


def _main(paths: Sequence[str]) -> None:
  for path in paths:
    with open(path, "rb") as f:
      call = pickle.load(f)
      for entry in reversed(call["sys_path"]):
        if entry not in sys.path:
          sys.path.insert(0, entry)
      args = pickle.load(f)
    try:
      result = _load_function(call["function"])(*args)
      emit({"status": "ok", **dict(result or {})})
    except Exception as e:  # pylint: disable=broad-except  (the item's outcome; the next item still runs)
      traceback.print_exc()
      text = f"{type(e).__name__}: {e}".strip()
      emit({"status": "error", "error": " ".join(line.strip() for line in text.splitlines() if line.strip())})


if __name__ == "__main__":
  _main(sys.argv[1:])
