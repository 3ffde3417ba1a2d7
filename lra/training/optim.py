"""Optimizer and learning-rate schedules from `config.train` (optax)."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import ml_collections
import optax


def _warmup(step, warmup_steps: int):
  return jnp.minimum(1.0, step / max(warmup_steps, 1))


def _rsqrt(lr: float, warmup_steps: int, num_steps: int) -> optax.Schedule:
  # LRA's "constant * linear_warmup * rsqrt_decay": base rate times min(1, t/w) / sqrt(max(t, w)).
  del num_steps
  return lambda count: lr * _warmup(count + 1, warmup_steps) * jnp.reciprocal(
      jnp.sqrt(jnp.maximum(count + 1.0, float(max(warmup_steps, 1)))))


def _cosine(lr: float, warmup_steps: int, num_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(num_steps, warmup_steps + 1), 0.0)


def _constant(lr: float, warmup_steps: int, num_steps: int) -> optax.Schedule:
  del num_steps
  return lambda count: lr * _warmup(count + 1, warmup_steps)


SCHEDULES: dict[str, Callable[[float, int, int], optax.Schedule]] = {
    "rsqrt": _rsqrt, "cosine": _cosine, "constant": _constant}


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """`train.schedule`: "rsqrt" (LRA: warmup then 1/sqrt decay of `learning_rate`), "cosine" (warmup to
  `learning_rate`, cosine to 0 at `num_steps`) or "constant" (warmup then flat)."""
  if train.schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {train.schedule!r}; valid choices: {', '.join(SCHEDULES)}")
  return SCHEDULES[train.schedule](train.learning_rate, train.warmup_steps, train.num_steps)


OPTIMIZERS = ("adamw",)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay on every parameter, as LRA) with optional global-norm gradient clipping."""
  if train.get("optimizer", "adamw") not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {train.optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")
  parts = []
  if train.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(train.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                           weight_decay=train.weight_decay))
  return optax.chain(*parts)
