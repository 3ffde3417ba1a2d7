"""Task heads and the models that join them to the encoder. Each model takes the task's batch dict."""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax

from lra.models.encoder import Encoder


class ClassifierHead(nn.Module):
  """LRA's classifier: Dense(mlp_dim) -> ReLU -> Dense(num_classes)."""

  num_classes: int
  mlp_dim: int

  @nn.compact
  def __call__(self, pooled_BxF: jax.Array) -> jax.Array:
    x = nn.Dense(self.mlp_dim, name="hidden")(pooled_BxF)
    x = nn.relu(x)
    return nn.Dense(self.num_classes, name="logits")(x)


class SequenceClassifier(nn.Module):
  """Encoder + classifier head on `batch["inputs"]` with padding mask `batch["mask"]`; returns `[B, classes]`."""

  encoder: Encoder
  num_classes: int
  head_mlp_dim: int

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    pooled = self.encoder(batch["inputs"], batch.get("mask"), train=train)
    return ClassifierHead(self.num_classes, self.head_mlp_dim, name="head")(pooled)
