"""The training loop: `train_and_evaluate(config, workdir)` for every task, and checkpoint evaluation.

Resume order (the one place it is written down):
  1. build task, model, optimizer and an initial state from `config.seed`;
  2. if `<workdir>/checkpoints` has a checkpoint, restore the latest: state (step, params, optimizer state) and meta
     (best validation value); the data position is the restored step, and dropout keys are folded from the step, so
     the next batches and keys equal those of an uninterrupted run;
  3. drop `metrics.jsonl` lines logged after that step (the crashed run may have logged past its last checkpoint);
  4. train from the restored step to `config.train.num_steps`.
Before step 1 the config is validated (lra/training/config_checks.py) and, when the workdir holds checkpoints, compared
with its `config.json` and the checkpoint's array shapes: a workdir of another task or model is refused by name.
A checkpoint written on preemption also holds the per-step metrics not yet logged (`meta["pending"]`), so the next
log line averages the same steps as in an uninterrupted run.
The last step of every run is logged, evaluated and checkpointed, so a larger `num_steps` extends a finished run.
With self-pretraining (`config.pretrain.steps > 0`) step 1 is followed, when no fine-tuning checkpoint exists, by the
pretraining phase (run or resumed with this same order in `<workdir>/pretrain`, see pretrain.py), whose encoder seeds
the fine-tuning state; `config.init_from` seeds it from another run. This module owns the phases: both run through
one setup, `run_phase` (checkpoints and resume, config.json, metric writer, loop); pretrain.py supplies the pretraining
phase's parts and imports nothing from here.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from lra import tasks as tasks_lib
from lra.tasks import pipeline
from jax.experimental import multihost_utils

from lra.training import checkpoints as checkpoints_lib
from lra.training import config_checks, metric_writers, optim, preemption, sharding
from lra.training import pretrain as pretrain_lib  # the pretraining phase's parts (pretrain.py imports no trainer)
from kernels import sequence as sequence_lib

# Rng streams given to the model: "dropout" for dropout, "attention" for variants that draw fresh randomness per
# call (feature redraws, hash rotations). Evaluation gets a fixed "attention" key and no dropout.
RNG_STREAMS = ("dropout", "attention")
# The one logged value that is not reproducible (wall clock); resumed runs match uninterrupted ones in all others.
STEPS_PER_SECOND = "steps_per_second"


# optax.tree.norm replaced optax.global_norm (deprecated) in recent optax; keep both working.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


class TrainState(train_state.TrainState):
  """flax's TrainState plus the model's non-trainable collections (everything but params and cache)."""

  model_state: Any = flax.struct.field(default_factory=dict)


def _variables(params: Any, model_state: Any) -> dict:
  return {"params": params, **model_state}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array, *,
               task: tasks_lib.Task) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update. Keys are folded from the step so a resumed run draws the same ones."""
  step_key = jax.random.fold_in(key, state.step)
  rngs = {name: jax.random.fold_in(step_key, i) for i, name in enumerate(RNG_STREAMS)}

  # Non-trainable collections (e.g. Performer's random features and their redraw counter) may change in training.
  mutable = sorted(state.model_state)

  def loss_fn(params):
    outputs, model_state = state.apply_fn(_variables(params, state.model_state), batch, train=True, rngs=rngs,
                                          mutable=mutable)
    loss, metrics = task.loss_and_metrics(outputs, batch)
    return loss, (metrics, model_state)

  (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads).replace(model_state={**state.model_state, **model_state})
  out = {name: total / jnp.maximum(weight, 1.0) for name, (total, weight) in metrics.items()}
  out["loss"] = loss
  out["grad_norm"] = _global_norm(grads)
  return new_state, out


def eval_step(params: Any, model_state: Any, batch: Mapping[str, jax.Array], *, apply_fn,
              task: tasks_lib.Task) -> dict[str, tuple[jax.Array, jax.Array]]:
  rngs = {"attention": jax.random.key(0)}
  outputs = apply_fn(_variables(params, model_state), batch, train=False, rngs=rngs)
  return task.loss_and_metrics(outputs, batch)[1]


class Experiment:
  """Everything built from a config: task, model, mesh, jitted steps, and the initial state."""

  def __init__(self, config: ml_collections.ConfigDict, task: tasks_lib.Task | None = None):
    """`task`: the task to train (default: the one `config.task` names; the pretraining phase passes its own)."""
    self.config = config
    sharding.maybe_initialize_distributed(config.mesh.get("distributed", "auto"))
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.train.batch_size, self.mesh)
    sharding.check_batch_size(config.train.eval_batch_size, self.mesh, "config.train.eval_batch_size")
    self.task = task if task is not None else tasks_lib.build(config)
    self.model: nn.Module = self.task.model()
    self.tx = optim.make_optimizer(config.train)
    self.batch_sharding = sharding.data_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    self.key = jax.random.key(config.seed)

  def init_state(self) -> TrainState:
    init_key, _ = jax.random.split(self.key)
    dummy = {k: jnp.asarray(v) for k, v in self.task.dummy_batch(1).items()}

    def init():
      rngs = {"params": init_key, **{n: jax.random.fold_in(init_key, i + 1) for i, n in enumerate(RNG_STREAMS)}}
      variables = dict(self.model.init(rngs, dummy, train=False))
      params = variables.pop("params")
      variables.pop("cache", None)
      return TrainState.create(apply_fn=self.model.apply, params=params, tx=self.tx, model_state=variables)

    return jax.jit(init, out_shardings=self.replicated)()

  def _in_mesh(self, fn):
    """`fn` traced with the mesh as the sequence mesh (kernels.sequence): layers then pick their sequence-parallel
    forms when `config.mesh.sequence > 1`."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      with sequence_lib.use_mesh(self.mesh):
        return fn(*args, **kwargs)
    return traced

  @functools.cached_property
  def jit_train_step(self):
    return jax.jit(self._in_mesh(functools.partial(train_step, task=self.task)),
                   in_shardings=(self.replicated, self.batch_sharding, self.replicated),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=0)

  @functools.cached_property
  def jit_eval_step(self):
    return jax.jit(self._in_mesh(functools.partial(eval_step, apply_fn=self.model.apply, task=self.task)),
                   in_shardings=(self.replicated, self.replicated, self.batch_sharding),
                   out_shardings=self.replicated)

  def evaluate(self, state: TrainState, split: str) -> dict[str, float]:
    """Exact metrics over a whole split (or `config.train.num_eval_batches` batches)."""
    dataset = self.task.dataset(split)
    totals: dict[str, list[float]] = {}
    rows, row_groups = sharding.process_rows(self.mesh)
    for batch in pipeline.eval_batches(dataset, batch_size=self.config.train.eval_batch_size,
                                       process_index=rows, process_count=row_groups,
                                       max_batches=self.config.train.get("num_eval_batches")):
      sums = self.jit_eval_step(state.params, state.model_state, sharding.to_global(batch, self.batch_sharding))
      for name, (total, weight) in jax.device_get(sums).items():
        acc = totals.setdefault(name, [0.0, 0.0])
        acc[0] += float(total)
        acc[1] += float(weight)
    return self.task.finalize_metrics(
        {name: total / max(weight, 1e-12) for name, (total, weight) in totals.items()})


def _is_better(value: float, best: float | None, mode: str) -> bool:
  if best is None:
    return True
  return value > best if mode == "max" else value < best


def _agreed(decision: bool) -> bool:
  """Process 0's `decision`, on every process: a save that one process skips would leave the others waiting in its
  barriers (the metrics are replicated, but a last-bit difference in a host-side sum must not split the hosts)."""
  if jax.process_count() == 1:
    return decision
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(decision, np.int32)))


def _pending_to_meta(pending: list[tuple[int, dict[str, Any]]]) -> list:
  """Unlogged per-step metrics as JSON, `[step, {name: [value, dtype]}]`; `_pending_from_meta` restores them
  bit-exactly."""
  fetched = jax.device_get([m for _, m in pending])
  return [[s, {k: [np.asarray(v).item(), str(np.asarray(v).dtype)] for k, v in m.items()}]
          for (s, _), m in zip(pending, fetched)]


def _pending_from_meta(records: list) -> list[tuple[int, dict[str, np.ndarray]]]:
  return [(int(s), {k: np.asarray(v, dtype=dtype) for k, (v, dtype) in m.items()}) for s, m in records]


def _config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config` as config.json records it: the options the user set plus every layer's resolved attention options."""
  return config_checks.config_record(config)


def _write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  # Written to a temporary name and renamed: other processes may read it (config_checks.check_workdir_config).
  tmp = workdir / f"config.json.tmp{jax.process_index()}"
  tmp.write_text(json.dumps(_config_record(config), indent=2, sort_keys=True, default=str) + "\n")
  tmp.replace(workdir / "config.json")


def _due(step: int, every: int | None, last: int) -> bool:
  return step == last or bool(every) and step % every == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, dict[str, float]]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the final metrics by split.

  With `config.pretrain.steps > 0` the encoder is first self-pretrained in the same call, and `config.init_from`
  starts fine-tuning from another run's encoder (lra/training/pretrain.py: phases, their workdir layout, resume)."""
  config_checks.validate_config(config)
  workdir = Path(workdir)
  config_checks.check_workdir_config(config, workdir, checkpoints_lib.LATEST_DIR)
  config_checks.check_workdir_config(config, workdir, pretrain_lib.PRETRAIN_CHECKPOINTS)
  workdir.mkdir(parents=True, exist_ok=True)
  exp = Experiment(config)
  # Fine-tuning has not started when no checkpoint exists: pretrain (or resume pretraining) first, or load init_from.
  _, final = run_phase(exp, workdir, workdir, pretrain_lib.finetune_phase(config),
                       seed_state=lambda state: starting_state(config, workdir, exp, state))
  return final


def run_phase(exp: Experiment, directory: Path, metrics_dir: Path, phase: str | None, *,
              seed_state: Callable[[TrainState], TrainState] | None = None, skip_finished: bool = False
              ) -> tuple[TrainState, dict[str, dict[str, float]] | None]:
  """One training phase, the same setup for fine-tuning and pretraining: checkpoints in `directory` and resume
  (`Checkpoints.resume`), `directory/config.json` (the phase's config, written after the checks so a refused run
  leaves it as it was), the metric rows of `phase` in `metrics_dir`, then `run_loop`.

  `seed_state(state)` replaces the initial state of a phase that did not resume (fine-tuning from a pretrained
  encoder); `skip_finished`: a phase resumed at its last step returns `(state, None)` without running again."""
  ckpt = checkpoints_lib.Checkpoints(directory, keep=exp.config.train.keep_checkpoints)
  state, meta, resumed = ckpt.resume(exp.init_state())
  if resumed:
    if skip_finished and int(meta["step"]) >= exp.config.train.num_steps:
      ckpt.close()
      logging.info("%s finished at step %d (%s)", phase or "training", meta["step"], directory)
      return state, None
    logging.info("Resumed %s from %s at step %d", phase or "training", directory / checkpoints_lib.LATEST_DIR,
                 meta["step"])
  is_writer = jax.process_index() == 0
  if is_writer:
    _write_config(exp.config, directory)
  if not resumed and seed_state is not None:
    try:
      state = seed_state(state)
    except BaseException:
      ckpt.close()
      raise
  writer = pretrain_lib.PhaseWriter(metrics_dir, enabled=is_writer, phase=phase)
  return run_loop(exp, directory, state, meta, ckpt, writer)


def run_pretraining(config: ml_collections.ConfigDict, workdir: Path, task: Any) -> Any:
  """Runs (or resumes, or finds finished) the pretraining phase in `<workdir>/pretrain`; returns the encoder params
  of its last step."""
  pconfig = pretrain_lib.phase_config(config)
  directory = Path(workdir) / pretrain_lib.PRETRAIN_DIR
  directory.mkdir(parents=True, exist_ok=True)
  exp = Experiment(pconfig, task=pretrain_lib.PretrainTask(task, config))
  logging.info("Self-pretraining (%s) for %d steps in %s", config.pretrain.objective, pconfig.train.num_steps,
               directory)
  state, _ = run_phase(exp, directory, Path(workdir), "pretrain", skip_finished=True)
  return state.params[pretrain_lib.ENCODER]


def starting_state(config: ml_collections.ConfigDict, workdir: Path, exp: Experiment, state: TrainState) -> TrainState:
  """The state fine-tuning starts from: `state` (from `config.seed`) with the pretrained encoder (running or resuming
  the pretraining phase first) or `config.init_from`'s encoder; `state` itself when neither is configured."""
  if pretrain_lib.enabled(config):
    encoder = run_pretraining(config, workdir, exp.task)
    return pretrain_lib.with_encoder(state, jax.device_get(encoder),
                                     f"the pretraining phase in {Path(workdir) / pretrain_lib.PRETRAIN_DIR}")
  init_from = config.get("init_from")
  if init_from:
    encoder, directory = pretrain_lib.load_init_from(init_from)
    logging.info("Fine-tuning starts from the encoder of %s", directory)
    return pretrain_lib.with_encoder(state, encoder, f"config.init_from={init_from} ({directory})")
  return state


def run_loop(exp: Experiment, workdir: Path, state: TrainState, meta: dict[str, Any],
             ckpt: checkpoints_lib.Checkpoints, writer: metric_writers.MetricWriter
             ) -> tuple[TrainState, dict[str, dict[str, float]]]:
  """Trains `state` (at step `meta["step"]`) to `exp.config.train.num_steps`, logging to `writer` and checkpointing to
  `ckpt`, evaluates `exp.task.eval_splits` at the end; closes `ckpt` and `writer`. One loop for every phase."""
  config = exp.config
  train_cfg = config.train
  num_steps = train_cfg.num_steps
  is_writer = jax.process_index() == 0
  start_step = int(meta["step"])
  writer.truncate_after(start_step)

  rows, row_groups = sharding.process_rows(exp.mesh)  # processes along "sequence" feed the same rows
  train_batches = pipeline.TrainBatches(exp.task.dataset(exp.task.train_split), batch_size=train_cfg.batch_size,
                                        seed=config.seed, process_index=rows, process_count=row_groups)
  progress = metric_writers.Progress(start_step, num_steps, enabled=is_writer)
  pending: list[tuple[int, dict[str, Any]]] = _pending_from_meta(meta.pop("pending", None) or [])
  task = exp.task
  final: dict[str, dict[str, float]] = {}

  def flush(step: int) -> None:
    """Fetches the pending per-step metrics, stops on a non-finite loss, logs their mean."""
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not math.isfinite(float(m["loss"])):
        raise FloatingPointError(f"non-finite training loss {float(m['loss'])} at step {s}; lower the learning "
                                 f"rate or enable config.train.grad_clip_norm (last checkpoint: {ckpt.latest_step()})")
    mean = task.finalize_metrics({k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]})
    mean["learning_rate"] = float(optim.learning_rate_schedule(train_cfg)(step - 1))
    now = time.monotonic()
    # Wall-clock throughput since the last log line (the first one includes compilation).
    mean[STEPS_PER_SECOND] = len(pending) / max(now - last_flush[0], 1e-9)
    last_flush[0] = now
    pending.clear()
    writer.write(step, "train", mean)
    progress.update(step, {"loss": mean["loss"]})

  t0 = time.monotonic()
  last_flush = [t0]
  guard = preemption.PreemptionGuard()
  try:
    with guard:
      for step in range(start_step + 1, num_steps + 1):
        batch = sharding.to_global(train_batches[step - 1], exp.batch_sharding)
        state, metrics = exp.jit_train_step(state, batch, exp.key)
        pending.append((step, metrics))
        checkpoint_due = _due(step, train_cfg.checkpoint_every_steps, num_steps)
        if _due(step, train_cfg.log_every_steps, num_steps) or checkpoint_due:
          flush(step)
        if _due(step, train_cfg.eval_every_steps, num_steps):
          final[task.validation_split] = metrics_val = exp.evaluate(state, task.validation_split)
          writer.write(step, task.validation_split, metrics_val)
          progress.write(f"step {step} {task.validation_split}: " +
                         " ".join(f"{k}={v:.4g}" for k, v in metrics_val.items()))
          value = metrics_val[task.best_metric]
          if _agreed(_is_better(value, meta.get("best"), task.best_mode)):
            meta = {**meta, "best": value, "best_step": step}
            ckpt.save_best(step, state, {**meta, "step": step})
        if checkpoint_due:
          meta = {**meta, "step": step}
          ckpt.save_latest(step, state, meta)
        # Every process asks after every step; the answer is the same step on all of them (see preemption.py).
        if step < num_steps and guard.should_stop(step):
          if not checkpoint_due:
            ckpt.save_latest(step, state, {**meta, "step": step, "pending": _pending_to_meta(pending)})
          stopped = preemption.Preempted(step, guard.signum, workdir)
          logging.warning("%s", stopped)
          raise stopped
        if not pending:  # keep evaluation and checkpointing out of the next throughput figure
          last_flush[0] = time.monotonic()
    flush(num_steps)
    for split in task.eval_splits:
      if split != task.validation_split or split not in final:
        final[split] = exp.evaluate(state, split)
        writer.write(int(state.step), split, final[split])
    logging.info("Finished %d steps in %.1f s; final metrics %s", num_steps - start_step, time.monotonic() - t0,
                 final)
  finally:
    progress.close()
    # Every process finishes both managers' saves (their barriers) before any may exit and shut jax down.
    ckpt.wait()
    ckpt.close()
    writer.close()
  return state, final


def restore_checkpoint(exp: Experiment, workdir: str | Path, checkpoint: str | int) -> tuple[TrainState, dict]:
  """The state and meta of `checkpoint` ("best", "latest" or a step) in `workdir`; FileNotFoundError if absent."""
  ckpt = checkpoints_lib.Checkpoints(Path(workdir), keep=exp.config.train.keep_checkpoints)
  try:
    restored = ckpt.restore(exp.init_state(), checkpoint)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no {checkpoint!r} checkpoint under {workdir}; train first with "
                            f"`python train.py --config ... --workdir {workdir}`")
  return restored


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | Path, split: str,
                        checkpoint: str | int = "best") -> dict[str, Any]:
  """Restores `checkpoint` ("best", "latest" or a step) from `workdir`, evaluates `split`, writes the result and
  returns it.

  The result records the length it was evaluated at (`max_length`). At the run's own length (the `config.json` in
  `workdir`, or no record of one) it goes to `<workdir>/eval_<split>.json`; at another length N (extrapolation) to
  `<workdir>/eval_<split>_length<N>.json` with `trained_max_length` beside it, so the run's own result is never
  overwritten by another length's."""
  config_checks.validate_config(config)
  workdir = Path(workdir)
  exp = Experiment(config)
  valid = exp.task.eval_splits + (exp.task.train_split,)
  if split not in valid:
    raise ValueError(f"unknown split {split!r} for task {config.task!r}; valid choices: {valid}")
  state, meta = restore_checkpoint(exp, workdir, checkpoint)
  metrics = exp.evaluate(state, split)
  length = config.data.get("max_length")
  trained_length = trained_max_length(workdir)
  result = {"split": split, "checkpoint": checkpoint, "step": int(meta["step"]), "max_length": length, **metrics}
  name = f"eval_{split}.json"
  if trained_length is not None and length != trained_length:
    result["trained_max_length"] = trained_length
    name = f"eval_{split}_length{length}.json"
  if jax.process_index() == 0:
    (workdir / name).write_text(json.dumps(result, indent=2) + "\n")
  return result


def trained_max_length(workdir: str | Path) -> int | None:
  """`data.max_length` of the run in `workdir` (its config.json), or None when it records none."""
  path = Path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text()).get("data", {}).get("max_length")
  except json.JSONDecodeError:
    return None
