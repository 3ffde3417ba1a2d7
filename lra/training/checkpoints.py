"""Orbax checkpoints in the workdir: `checkpoints/` keeps the latest K, `best/` the best by the validation metric.

Each checkpoint holds the train state (step, params, optimizer state, non-trainable model state) and a JSON `meta`
record: the step (which is also the data position, see lra/tasks/pipeline.py) and the best validation value so far.

Multi-host rules (every process must reach every orbax barrier, in the same order):
- the two managers save concurrently, so each has its own barrier-key prefix: orbax names its async-commit barriers
  after the step directory ("6.orbax-checkpoint-tmp"), and a `latest` and a `best` save of the same step would
  otherwise meet in each other's barriers and deadlock;
- every process calls `save_*`, `wait` and `close` in the same order (the caller decides "is this the best?" from
  globally identical metrics, see trainer.py), and `wait` finishes both managers before the process may exit and
  shut jax.distributed down.
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


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  # Registered up front so a fresh manager can read a checkpoint's metadata (shapes) before restoring it.
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add("state", args, ocp.StandardCheckpointHandler)
  for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
    registry.add("meta", args, ocp.JsonCheckpointHandler)
  return registry


def _manager(directory: Path, keep: int, prefix: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix))
  return ocp.CheckpointManager(directory, options=options, handler_registry=_handler_registry())


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{"params/encoder/...": shape}` of a tree of arrays or of orbax array metadata. Paths are normalized (a saved
  dataclass comes back as a dict, a namedtuple as a list), so the same array has the same path in both."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(_key_name(entry) for entry in path)] = tuple(getattr(leaf, "shape", ()) or ())
  return out


def tree_differences(saved: Any, target: Any, limit: int = 4) -> list[str]:
  """Human-readable differences between the arrays of a saved checkpoint and those of `target`: missing, extra,
  or of another shape (dtype differences are restored by casting, so they are not reported)."""
  saved_shapes, target_shapes = _shapes(saved), _shapes(target)
  diffs = []
  for key in sorted(set(saved_shapes) | set(target_shapes)):
    if key not in target_shapes:
      diffs.append(f"{key} is in the checkpoint but not in this model")
    elif key not in saved_shapes:
      diffs.append(f"{key} {target_shapes[key]} is missing from the checkpoint")
    elif saved_shapes[key] != target_shapes[key]:
      diffs.append(f"{key} has shape {saved_shapes[key]} in the checkpoint, {target_shapes[key]} in this model")
  # Optimizer moments repeat the parameters' shapes: name the parameters when they differ.
  own = [d for d in diffs if not d.startswith("opt_state/")]
  diffs = own or diffs
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
  return diffs


class Checkpoints:
  """Saves and restores train states; `keep` latest plus one best."""

  def __init__(self, workdir: Path, keep: int = 3):
    if keep < 1:
      raise ValueError(f"config.train.keep_checkpoints must be >= 1, got {keep}")
    self.workdir = Path(workdir).absolute()
    self.latest = _manager(self.workdir / LATEST_DIR, keep, "latest")
    self.best = _manager(self.workdir / BEST_DIR, 1, "best")

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

  def _resolve(self, which: str | int) -> tuple[ocp.CheckpointManager, int | None]:
    if which in CHOICES:
      manager = self.latest if which == "latest" else self.best
      return manager, manager.latest_step()
    if isinstance(which, int) and not isinstance(which, bool):
      if which not in self.latest.all_steps():
        raise ValueError(f"no checkpoint at step {which} under {self.workdir / LATEST_DIR}; available steps: "
                         f"{sorted(self.latest.all_steps())}")
      return self.latest, which
    raise ValueError(f"checkpoint must be one of {CHOICES} or a step number, got {which!r}")

  def check_compatible(self, target: Any, which: str | int = "latest") -> None:
    """Raises ValueError naming the differing arrays when checkpoint `which` does not fit `target` (a workdir of
    another model or task), instead of letting orbax fail mid-restore."""
    manager, step = self._resolve(which)
    if step is None:
      return
    try:
      saved = manager.item_metadata(step)["state"]
    except Exception:  # pylint: disable=broad-except
      # Metadata unreadable (an older orbax layout): the restore below reports what it finds.
      return
    if saved is None:
      return
    diffs = tree_differences(saved, target)
    if diffs:
      raise ValueError(
          f"the checkpoint at {Path(manager.directory) / str(step)} was written by a different model or task: "
          + "; ".join(diffs) + ". Train this config in a new --workdir (or delete the old one)")

  def restore(self, target: Any, which: str | int = "latest") -> tuple[Any, dict] | None:
    """Restores `which` ("latest", "best" or a step of the latest manager) into the shapes and shardings of
    `target`; None if there is no such checkpoint. A checkpoint of other shapes is a ValueError naming them."""
    manager, step = self._resolve(which)
    if step is None:
      return None
    self.check_compatible(target, which)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)),
                                                             meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def resume(self, state: Any) -> tuple[Any, dict, bool]:
    """`(state, meta, resumed)`: the latest checkpoint restored into `state`'s structure, or `state` itself at step
    0 when there is none. A restore that fails (another model's checkpoint) closes the managers before raising, so
    the caller's error is not followed by orbax's background threads."""
    try:
      restored = self.restore(state, "latest")
    except BaseException:
      self.close()
      raise
    if restored is None:
      return state, {"step": 0, "best": None}, False
    return restored[0], restored[1], True

  def wait(self) -> None:
    """Blocks until both managers' async saves are committed (on every process, in this order)."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def step_directory(path: str | Path) -> Path:
  """The checkpoint step folder `path` names: a step folder itself (`<workdir>/checkpoints/600`, `.../best/400`), a
  checkpoint manager folder (its latest step) or a workdir (its `checkpoints/`, else its pretraining phase's:
  `pretrain/checkpoints/`). FileNotFoundError naming the path when there is none."""
  path = Path(path).expanduser().absolute()
  if (path / "state").is_dir():
    return path
  for managed in (path, path / LATEST_DIR, path / "pretrain" / LATEST_DIR):
    steps = sorted(int(p.name) for p in managed.glob("*") if p.name.isdigit() and (p / "state").is_dir()) \
        if managed.is_dir() else []
    if steps:
      return managed / str(steps[-1])
  raise FileNotFoundError(f"no checkpoint found at {path}: give a workdir of a finished or pretrained run, its "
                          f"checkpoints/ folder or one step folder (e.g. {path / LATEST_DIR / '600'})")


def read_params(path: str | Path) -> tuple[Any, Path]:
  """The `params` tree (host arrays) of the checkpoint at `path` (see `step_directory`) and its step folder, restored
  without a target model: for starting another run from it (`config.init_from`)."""
  directory = step_directory(path)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(directory / "state")
  return jax.device_get(state["params"]), directory
