"""Shared pieces of the LRA classification tasks: splits built once per task object, and the classifier model."""

from __future__ import annotations

import abc
from typing import ClassVar

import ml_collections

from lra.models import SequenceClassifier, encoder_from_config
from lra.tasks.base import ArrayDataset, ClassificationTask


class SplitTask(ClassificationTask):
  """A classification task whose splits are named in `splits` and built once (the trainer asks for the validation
  split at every evaluation; rebuilding it would reload the cached arrays each time)."""

  splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self._datasets: dict[str, ArrayDataset] = {}

  def dataset(self, split: str) -> ArrayDataset:
    if split not in self.splits:
      raise ValueError(f"unknown {self.name} split {split!r}; valid choices: {self.splits}")
    if split not in self._datasets:
      self._datasets[split] = self.build_dataset(split)
    return self._datasets[split]

  @abc.abstractmethod
  def build_dataset(self, split: str) -> ArrayDataset:
    """The examples of `split` (a member of `splits`)."""


def sequence_classifier(config: ml_collections.ConfigDict, *, vocab_size: int, max_length: int,
                        num_classes: int) -> SequenceClassifier:
  """The encoder of `config.model` with LRA's classifier head (hidden size `head_mlp_dim`, default `mlp_dim`)."""
  model_config = config.model
  encoder = encoder_from_config(model_config, vocab_size=vocab_size, max_length=max_length)
  return SequenceClassifier(encoder=encoder, num_classes=num_classes,
                            head_mlp_dim=model_config.get("head_mlp_dim") or model_config.mlp_dim)
