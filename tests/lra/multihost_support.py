"""Runs train.py in N local processes x D CPU devices (gloo collectives), as a multi-host job would, with a hard time
limit: on timeout every process group is killed, so a deadlock fails in seconds instead of blocking CI.

Used by tests/lra/test_multihost.py, tests/lra/training/test_preemption.py and scripts/check_multihost.py.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Callable, Sequence

from configs.lra import listops
from tests.conftest import python_path, tiny_listops_config, xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]

# train.py as `python -c`: optionally slows each training batch down (LRA_TEST_STEP_SLEEP seconds) and announces it
# on stdout, so a test can send a signal while training runs.
TRAIN_PY = textwrap.dedent("""
    import os, runpy, sys, time
    delay = float(os.environ.get("LRA_TEST_STEP_SLEEP", "0"))
    if delay:
      from lra.tasks import pipeline
      original = pipeline.TrainBatches.__getitem__
      def slow(self, index):
        print(f"batch {index}", flush=True)
        time.sleep(delay)
        return original(self, index)
      pipeline.TrainBatches.__getitem__ = slow
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path("train.py", run_name="__main__")
""")


def tiny_flags(cache_dir, **train_overrides) -> list[str]:
  """Command-line overrides turning configs/lra/listops.py:runlocal into tests.conftest.tiny_listops_config."""
  base = listops.get_config("runlocal").to_dict()
  tiny = tiny_listops_config(cache_dir, **train_overrides).to_dict()
  out = []

  def walk(a, b, prefix):
    for key, value in b.items():
      if isinstance(value, dict):
        walk(a.get(key, {}), value, f"{prefix}{key}.")
      elif a.get(key) != value:
        out.append(f"--config.{prefix}{key}={value}")
  walk(base, tiny, "")
  return ["--config=configs/lra/listops.py:runlocal", *out]


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _kill(procs: Sequence[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)  # the process group: nothing it started survives
      except ProcessLookupError:
        pass
  for p in procs:
    p.wait()


def run_processes(argv: Sequence[str], *, num_processes: int = 2, devices_per_process: int = 2, timeout: float = 120,
                  env: dict | None = None,
                  on_output: Callable[[list[subprocess.Popen], list[pathlib.Path]], None] | None = None
                  ) -> list[Result]:
  """Starts `python -c TRAIN_PY *argv` as processes 0..N-1 of one jax.distributed job (one process: a plain run)
  and waits for all of them.

  `timeout` is a hard limit for the whole job: past it every process is killed and TimeoutError names the tails
  of their logs. `on_output(procs, stdout_paths)` is polled while they run (e.g. to send a signal).
  Output goes to files, not pipes: a full pipe would block a process and look like a deadlock.
  """
  port = _free_port()
  procs, outs, errs = [], [], []
  with tempfile.TemporaryDirectory() as logs:
    logs = pathlib.Path(logs)
    try:
      for i in range(num_processes):
        proc_env = {**os.environ, "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices_per_process}"),
                    "JAX_PLATFORMS": "cpu", "PYTHONPATH": python_path(), **(env or {})}
        if num_processes > 1:  # one process runs without jax.distributed, as a plain `python train.py`
          proc_env.update({"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(num_processes),
                           "JAX_PROCESS_ID": str(i), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"})
        outs.append(logs / f"out{i}")
        errs.append(logs / f"err{i}")
        with open(outs[-1], "w") as out, open(errs[-1], "w") as err:
          procs.append(subprocess.Popen([sys.executable, "-c", TRAIN_PY, *argv], env=proc_env, cwd=ROOT, stdout=out,
                                        stderr=err, start_new_session=True))
      deadline = time.monotonic() + timeout
      while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
          _kill(procs)
          tails = "\n".join(f"--- process {i} stderr:\n{e.read_text()[-2000:]}" for i, e in enumerate(errs))
          raise TimeoutError(f"{num_processes} processes did not finish within {timeout} s (killed):\n{tails}")
        if on_output is not None:
          on_output(procs, outs)
        time.sleep(0.1)
      return [Result(p.returncode, o.read_text(), e.read_text()) for p, o, e in zip(procs, outs, errs)]
    finally:
      _kill(procs)


def signal_when(pattern: str, signum: int, targets: Sequence[int]) -> Callable:
  """An `on_output` callback: once every process printed `pattern`, sends `signum` to the processes `targets`."""
  sent = []

  def poll(procs, outs):
    if not sent and all(pattern in o.read_text() for o in outs):
      for i in targets:
        procs[i].send_signal(signum)
      sent.append(True)
  return poll
