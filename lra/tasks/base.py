"""What a task provides: its splits as in-memory arrays, its model, and its loss and metrics.

Batches are dicts of numpy arrays. Evaluation batches carry `weights` (0 for the rows that pad the last batch), so
metrics are exact sums over a split, never means of batch means.

A task subclasses one of three bases, each with its model, loss, metrics and batch layout written once:
`ClassificationTask` (one sequence -> a class), `MatchingTask` (a pair of sequences through one shared encoder ->
a class) and `lra.tasks.causal_lm.LanguageModelTask` (next-token prediction). What is left to a task is
`build_dataset(split)` and a few class attributes (`num_classes`, `vocab_size`, `input_dtype`); `dummy_batch` comes
from `input_spec()`, which the bases derive from those attributes and `config.data.max_length`.
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

from lra.models import SequenceClassifier, encoder_from_config
from lra.models.heads import DualEncoderMatcher

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
  # Every split `dataset` accepts.
  splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._datasets: dict[str, ArrayDataset] = {}

  def dataset(self, split: str) -> ArrayDataset:
    """The split's examples, built once per task object (the trainer asks for the validation split at every
    evaluation; rebuilding it would reload the cached arrays each time)."""
    if split not in self.splits:
      raise ValueError(f"unknown {self.name} split {split!r}; valid choices: {self.splits}")
    if split not in self._datasets:
      self._datasets[split] = self.build_dataset(split)
    return self._datasets[split]

  @abc.abstractmethod
  def build_dataset(self, split: str) -> ArrayDataset:
    """The examples of `split` (a member of `splits`), loaded or generated once, then cached on disk."""

  @abc.abstractmethod
  def model(self) -> nn.Module:
    """The model: `model.apply(variables, batch, train=...)` returns what `loss_and_metrics` takes."""

  @abc.abstractmethod
  def loss_and_metrics(self, outputs: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
    """Mean training loss over the batch (weighted by `batch["weights"]` if present) and metric sums."""

  @abc.abstractmethod
  def input_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape (without the batch axis) and dtype of each array of one example, as the datasets hold them."""

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of `input_spec`'s shapes and dtypes, for initialisation, compiling and benchmarks (no data is read):
    boolean arrays (masks) all True, so every position is real; everything else zero."""
    return {name: (np.ones if spec.dtype == np.bool_ else np.zeros)((batch_size, *spec.shape), spec.dtype)
            for name, spec in self.input_spec().items()}

  def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    """Metrics derived from the exact split-level means (e.g. perplexity = exp(mean token loss))."""
    return metrics

  def pretrain_token_keys(self) -> tuple[tuple[str, str], ...]:
    """(tokens key, padding-mask key) pairs of a batch that self-pretraining trains on (lra/training/pretrain.py):
    by default every `inputs<suffix>` with its `mask<suffix>` (Retrieval: both documents)."""
    keys = self.dummy_batch(1)
    return tuple((k, "mask" + k[len("inputs"):]) for k in sorted(keys) if k.startswith("inputs"))


def head_mlp_dim(model_config: ml_collections.ConfigDict) -> int:
  """Hidden size of the classifier / matcher head: `head_mlp_dim`, default `mlp_dim` (LRA's)."""
  return model_config.get("head_mlp_dim") or model_config.mlp_dim


def sequence_classifier(config: ml_collections.ConfigDict, *, vocab_size: int, max_length: int,
                        num_classes: int) -> SequenceClassifier:
  """The encoder of `config.model` with LRA's classifier head."""
  encoder = encoder_from_config(config.model, vocab_size=vocab_size, max_length=max_length)
  return SequenceClassifier(encoder=encoder, num_classes=num_classes, head_mlp_dim=head_mlp_dim(config.model))


class ClassificationTask(Task):
  """Sequence classification: `inputs` token ids `[L]` with their padding `mask` -> `targets`, a class id. The model is
  the encoder with LRA's classifier head; cross-entropy loss, accuracy.

  A subclass sets `num_classes`, `vocab_size` (a class attribute, or a property when the data defines it) and, if its
  tokens are not int16, `input_dtype`; `length` (the tokens per example) is `config.data.max_length` unless the task
  fixes it (images: height x width).
  """

  num_classes: ClassVar[int] = 2
  vocab_size: ClassVar[int]
  input_dtype: ClassVar[type] = np.int16

  @property
  def length(self) -> int:
    """Tokens per example."""
    return self.config.data.max_length

  def input_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    tokens = jax.ShapeDtypeStruct((self.length,), self.input_dtype)
    return {"inputs": tokens, "mask": jax.ShapeDtypeStruct((self.length,), np.bool_),
            "targets": jax.ShapeDtypeStruct((), np.int32)}

  def model(self) -> nn.Module:
    return sequence_classifier(self.config, vocab_size=self.vocab_size, max_length=self.length,
                               num_classes=self.num_classes)

  def loss_and_metrics(self, logits_BxC: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
    targets = batch["targets"]
    weights = batch.get("weights")
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits_BxC, axis=-1) == targets).astype(jnp.float32)
    total = jnp.sum(weights)
    loss = jnp.sum(losses * weights) / jnp.maximum(total, 1.0)
    return loss, {"loss": (jnp.sum(losses * weights), total), "accuracy": (jnp.sum(correct * weights), total)}


class MatchingTask(ClassificationTask):
  """Classification of a pair of sequences (`inputs1`/`mask1`, `inputs2`/`mask2` -> `targets`): one shared encoder
  applied to each side, then `[u, v, u*v, u-v]` (`|u-v|` with `abs_difference`) -> MLP -> classes."""

  abs_difference: ClassVar[bool] = False

  def input_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    one = super().input_spec()
    return {"inputs1": one["inputs"], "mask1": one["mask"], "inputs2": one["inputs"], "mask2": one["mask"],
            "targets": one["targets"]}

  def model(self) -> nn.Module:
    encoder = encoder_from_config(self.config.model, vocab_size=self.vocab_size, max_length=self.length)
    return DualEncoderMatcher(encoder=encoder, num_classes=self.num_classes,
                              head_mlp_dim=head_mlp_dim(self.config.model), abs_difference=self.abs_difference)
