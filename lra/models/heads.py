"""Task heads and the models that join them to the encoder. Each model takes the task's batch dict."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lra.models.encoder import Encoder


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _logits(x: jax.Array, num_classes: int) -> jax.Array:
  """The output layer in float32, so losses and their reductions accumulate in float32 whatever the compute dtype."""
  return _dense(num_classes, "logits", jnp.float32)(x.astype(jnp.float32))


class ClassifierHead(nn.Module):
  """LRA's classifier: Dense(mlp_dim) -> ReLU -> Dense(num_classes); float32 logits."""

  num_classes: int
  mlp_dim: int
  dtype: Any = jnp.float32  # compute dtype of the hidden layer

  @nn.compact
  def __call__(self, pooled_BxF: jax.Array) -> jax.Array:
    x = nn.relu(_dense(self.mlp_dim, "hidden", self.dtype)(pooled_BxF))
    return _logits(x, self.num_classes)


class SequenceClassifier(nn.Module):
  """Encoder + classifier head on `batch["inputs"]` with padding mask `batch["mask"]`; returns `[B, classes]`."""

  encoder: Encoder
  num_classes: int
  head_mlp_dim: int

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    pooled = self.encoder(batch["inputs"], batch.get("mask"), train=train)
    return ClassifierHead(self.num_classes, self.head_mlp_dim, dtype=self.encoder.compute_dtype, name="head")(pooled)


class MatchingHead(nn.Module):
  """LRA's dual-encoder head on two pooled encodings u, v: `[u, v, u*v, u-v]` -> Dense(mlp_dim) -> ReLU ->
  Dense(mlp_dim // 2) -> ReLU -> Dense(num_classes) (float32 logits). `abs_difference=True` uses `|u-v|` (the SNLI
  convention)."""

  num_classes: int
  mlp_dim: int
  abs_difference: bool = False
  dtype: Any = jnp.float32  # compute dtype of the hidden layers

  @nn.compact
  def __call__(self, u_BxF: jax.Array, v_BxF: jax.Array) -> jax.Array:
    difference = jnp.abs(u_BxF - v_BxF) if self.abs_difference else u_BxF - v_BxF
    x = jnp.concatenate([u_BxF, v_BxF, u_BxF * v_BxF, difference], axis=-1)
    x = nn.relu(_dense(self.mlp_dim, "hidden", self.dtype)(x))
    x = nn.relu(_dense(self.mlp_dim // 2, "hidden2", self.dtype)(x))
    return _logits(x, self.num_classes)


class DualEncoderMatcher(nn.Module):
  """Two-tower matcher: one shared encoder applied to each input of the pair, then `MatchingHead`.

  Takes `batch["inputs1"]`, `batch["inputs2"]` (`[B, L]`, equal lengths) with masks `batch["mask1"]`,
  `batch["mask2"]`; returns `[B, classes]`. The two sides run as one encoder call on the `[2B, L]` stack: the same
  parameters and outputs as two calls, in one pass.
  """

  encoder: Encoder
  num_classes: int
  head_mlp_dim: int
  abs_difference: bool = False

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    inputs1, inputs2 = batch["inputs1"], batch["inputs2"]
    if inputs1.shape != inputs2.shape:
      raise ValueError(f"inputs1 {inputs1.shape} and inputs2 {inputs2.shape} must have the same shape")
    masks = [jnp.ones(x.shape, bool) if m is None else m for x, m in ((inputs1, batch.get("mask1")),
                                                                     (inputs2, batch.get("mask2")))]
    mask = jnp.concatenate(masks, axis=0)
    pooled = self.encoder(jnp.concatenate([inputs1, inputs2], axis=0), mask, train=train)
    u, v = jnp.split(pooled, 2, axis=0)
    return MatchingHead(self.num_classes, self.head_mlp_dim, self.abs_difference, dtype=self.encoder.compute_dtype,
                        name="head")(u, v)
