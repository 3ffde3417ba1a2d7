"""Preemption: SIGTERM (TPU VM preemption, SLURM, Kubernetes) or SIGINT (Ctrl-C) stops training at the next step
boundary that every process agrees on; the loop then saves a checkpoint and raises `Preempted`.

One process: a Python signal handler sets a flag that the loop reads after each step (no device sync).

Several processes (jax.distributed): jax's preemption sync manager, which `jax.distributed.initialize()` starts and
which owns SIGTERM. When any process receives SIGTERM, the coordination service tells the others, they agree on
max(current steps) + 1 in the background, and `multihost_utils.reached_preemption_sync_point(step)` becomes True on
every process at that same step. Checking it is a local read each step (no collective, no host sync); the
agreement costs a few RPCs once, after a notice. SIGINT is forwarded to the process's own SIGTERM so Ctrl-C on one
host takes the same path.

A second SIGINT while waiting for the step boundary interrupts at once (KeyboardInterrupt), as Ctrl-C usually does.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped early on a signal after checkpointing `step`; rerunning the same command resumes.

  `exit_code` follows the shell convention for a death by signal (128 + signal number: 143 for SIGTERM, 130 for
  SIGINT), so schedulers and shells see an unfinished run.
  """

  def __init__(self, step: int, signum: int, workdir: Any = None):
    self.step, self.signum, self.workdir = step, signum, workdir
    self.exit_code = 128 + signum
    name = signal.Signals(signum).name
    super().__init__(f"preempted ({name}) at step {step}: checkpoint saved in {workdir}; rerun the same command to "
                     f"resume")


def _multi_process() -> bool:
  return jax.process_count() > 1 and jax.distributed.is_initialized()


class PreemptionGuard:
  """Context manager installing the handlers; `should_stop(step)` after each step says whether to stop there.

  Handlers are installed only from the main thread (Python's rule); elsewhere the guard never stops the loop.
  """

  def __init__(self) -> None:
    self._signum: int | None = None
    self._previous: dict[int, Any] = {}
    self._multi = False

  @property
  def signum(self) -> int:
    return self._signum if self._signum is not None else signal.SIGTERM

  def _on_signal(self, signum: int, frame: FrameType | None) -> None:
    del frame
    if self._signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step boundary
    self._signum = signum
    logging.warning("Received %s: stopping at the next step boundary to save a checkpoint",
                    signal.Signals(signum).name)
    if self._multi and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # jax's preemption notifier listens to SIGTERM only

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      return self
    self._multi = _multi_process()
    # With several processes jax's notifier owns SIGTERM; a Python handler would replace it.
    for signum in (signal.SIGINT,) if self._multi else SIGNALS:
      self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """True when every process should stop after `step` (call it after every step, on every process)."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signum is not None
