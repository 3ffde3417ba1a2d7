"""What a task provides: its splits as in-memory arrays, its model, and its loss and metrics.

Batches are dicts of numpy arrays. Evaluation batches carry `weights` (0 for the rows that pad the last batch), so
metrics are exact sums over a split, never means of batch means.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

Metrics = dict[str, tuple[jax.Array, jax.Array]]  # name -> (sum, weight); the metric is sum / weight


class ArrayDataset:
  """A split held as equal-length numpy arrays; indexing gives one example (a grain random-access source)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"arrays of one split must have the same number of examples, got {lengths}")
    self.arrays = dict(arrays)

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}


class Task(abc.ABC):
  """Base class of registered tasks. `config` is the whole experiment config."""

  name: ClassVar[str] = ""
  # The validation metric that selects the best checkpoint, and whether higher is better.
  best_metric: ClassVar[str] = "accuracy"
  best_mode: ClassVar[str] = "max"
  # Split names: the first is trained on, the second selects the best checkpoint.
  train_split: ClassVar[str] = "train"
  validation_split: ClassVar[str] = "validation"
  eval_splits: ClassVar[tuple[str, ...]] = ("validation", "test")

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @abc.abstractmethod
  def dataset(self, split: str) -> ArrayDataset:
    """The split's examples (loaded or generated once, then cached)."""

  @abc.abstractmethod
  def model(self) -> nn.Module:
    """The model: `model.apply(variables, batch, train=...)` returns what `loss_and_metrics` takes."""

  @abc.abstractmethod
  def loss_and_metrics(self, outputs: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
    """Mean training loss over the batch (weighted by `batch["weights"]` if present) and metric sums."""

  @abc.abstractmethod
  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of the right shapes and dtypes, for initialisation."""

  def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    """Metrics derived from the exact split-level means (e.g. perplexity = exp(mean token loss))."""
    return metrics

  def pretrain_token_keys(self) -> tuple[tuple[str, str], ...]:
    """(tokens key, padding-mask key) pairs of a batch that self-pretraining trains on (lra/training/pretrain.py):
    by default every `inputs<suffix>` with its `mask<suffix>` (Retrieval: both documents)."""
    keys = self.dummy_batch(1)
    return tuple((k, "mask" + k[len("inputs"):]) for k in sorted(keys) if k.startswith("inputs"))


class ClassificationTask(Task):
  """Sequence classification: `batch["targets"]` are class ids; cross-entropy loss, accuracy."""

  num_classes: ClassVar[int] = 2

  def loss_and_metrics(self, logits_BxC: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
    targets = batch["targets"]
    weights = batch.get("weights")
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits_BxC, axis=-1) == targets).astype(jnp.float32)
    total = jnp.sum(weights)
    loss = jnp.sum(losses * weights) / jnp.maximum(total, 1.0)
    return loss, {"loss": (jnp.sum(losses * weights), total), "accuracy": (jnp.sum(correct * weights), total)}
