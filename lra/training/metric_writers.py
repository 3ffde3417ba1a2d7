"""Run outputs: `metrics.jsonl` (one JSON object per line: step, split, metric names), TensorBoard events and a
progress display (a tqdm bar on a terminal, plain log lines otherwise)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Mapping

import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard. Only the writing process (process 0) writes."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.path = Path(workdir) / METRICS_FILE
    self.enabled = enabled
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(workdir))

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after `step`: a resumed run re-logs them, so the file matches an uninterrupted run."""
    if not self.enabled or not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in metrics.items():
      if math.isfinite(float(value)):
        self._tb.add_scalar(f"{split}/{name}", float(value), step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: Path) -> list[dict]:
  """All records of `<workdir>/metrics.jsonl`."""
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
  """Step, loss, steps/s and ETA: a tqdm bar on an interactive terminal, log lines every update otherwise."""

  def __init__(self, start_step: int, num_steps: int, enabled: bool = True):
    self.num_steps = num_steps
    self._start_step, self._start_time = start_step, time.monotonic()
    interactive = enabled and sys.stderr.isatty()
    self._enabled = enabled
    self._bar = tqdm.tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True) if interactive \
        else None

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=True)
      return
    elapsed = time.monotonic() - self._start_time
    rate = (step - self._start_step) / elapsed if elapsed > 0 else float("nan")
    eta = (self.num_steps - step) / rate if rate > 0 else float("nan")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    values = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    logging.info("step %d/%d %s %.2f steps/s ETA %s", step, self.num_steps, values, rate, eta_text)

  def write(self, message: str) -> None:
    if self._bar is not None:
      self._bar.write(message)
    elif self._enabled:
      logging.info("%s", message)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
