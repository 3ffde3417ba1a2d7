"""Orbax checkpoints in the workdir: `checkpoints/` keeps the latest K, `best/` the best by the validation metric.

Each checkpoint holds the train state (step, params, optimizer state, non-trainable model state) and a JSON `meta`
record: the step (which is also the data position, see lra/tasks/pipeline.py) and the best validation value so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

LATEST_DIR, BEST_DIR = "checkpoints", "best"
CHOICES = ("best", "latest")


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
  """Saves and restores train states; `keep` latest plus one best."""

  def __init__(self, workdir: Path, keep: int = 3):
    if keep < 1:
      raise ValueError(f"config.train.keep_checkpoints must be >= 1, got {keep}")
    workdir = Path(workdir).absolute()
    self.latest = ocp.CheckpointManager(workdir / LATEST_DIR,
                                        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(workdir / BEST_DIR,
                                      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  @staticmethod
  def _save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)

  def save_latest(self, step: int, state: Any, meta: dict) -> None:
    self._save(self.latest, step, state, meta)

  def save_best(self, step: int, state: Any, meta: dict) -> None:
    self._save(self.best, step, state, meta)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore(self, target: Any, which: str | int = "latest") -> tuple[Any, dict] | None:
    """Restores `which` ("latest", "best" or a step of the latest manager) into the shapes and shardings of
    `target`; None if there is no such checkpoint."""
    if which in CHOICES:
      manager = self.latest if which == "latest" else self.best
      step = manager.latest_step()
    elif isinstance(which, int):
      manager, step = self.latest, which
      if step not in manager.all_steps():
        raise ValueError(f"no checkpoint at step {step}; available steps: {sorted(manager.all_steps())}")
    else:
      raise ValueError(f"checkpoint must be one of {CHOICES} or a step number, got {which!r}")
    if step is None:
      return None
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)),
                                                             meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
