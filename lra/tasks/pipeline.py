"""Batches from an `ArrayDataset` with grain: shuffled, repeated training batches addressable by step, and padded
evaluation batches with per-row weights.

Training batch `s` is `train_batches(...)[s]`: the data position is the step, so a resumed run sees exactly the batches
an uninterrupted run would. On several hosts every process reads the same global batch and keeps its own rows, so the
global batch does not depend on the number of processes.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from lra.tasks.base import ArrayDataset


def _local_rows(batch: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
  size = len(next(iter(batch.values())))
  if size % process_count:
    raise ValueError(f"batch size {size} must be a multiple of the number of processes {process_count}")
  per = size // process_count
  return {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}


class TrainBatches:
  """Infinite shuffled batches (reshuffled every epoch), random access by step."""

  def __init__(self, dataset: ArrayDataset, *, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) < batch_size:
      raise ValueError(f"the training split has {len(dataset)} examples, fewer than batch_size={batch_size}")
    self._ds = grain.MapDataset.source(dataset).shuffle(seed=seed).repeat(None).batch(batch_size,
                                                                                      drop_remainder=True)
    self._process_index, self._process_count = process_index, process_count

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    return _local_rows(self._ds[step], self._process_index, self._process_count)

  def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      yield self[step]
      step += 1


def eval_batches(dataset: ArrayDataset, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                 max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order; the last batch is padded with zero-weight copies of the first rows."""
  ds = grain.MapDataset.source(dataset).batch(batch_size, drop_remainder=False)
  for i in range(len(ds) if max_batches is None else min(len(ds), max_batches)):
    batch = ds[i]
    n = len(next(iter(batch.values())))
    weights = np.ones((batch_size,), np.float32)
    if n < batch_size:
      batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)]) for k, v in batch.items()}
      weights[n:] = 0.0
    batch["weights"] = weights
    yield _local_rows(batch, process_index, process_count)
