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


# ----------------------------------------------------------------------------------------------------------------------
# Self-pretraining ("Never Train from Scratch", Amos et al., ICLR 2024): the task's own inputs, denoised or continued.

OBJECTIVES = ("masked", "causal")
# BERT's split of the selected positions: 80% replaced by the mask token, 10% by a random token, 10% left unchanged.
_MASK_FRACTION, _RANDOM_FRACTION = 0.8, 0.1


class TokenPredictionHead(nn.Module):
  """Per-position logits over the vocabulary from the encoder's token outputs `[B, L, F]` -> float32 `[B, L, V]`.

  tied=True (default): the transposed token embedding (passed as `embedding_VxF`) plus a bias, scaled by
  1/sqrt(F) as `LanguageModel` (the embedding has unit variance); the head then owns only the bias, so almost all of
  what pretraining learns sits in the encoder that fine-tuning keeps. tied=False: a separate Dense layer.
  """

  vocab_size: int
  tied: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden_BxLxF: jax.Array, embedding_VxF: jax.Array | None = None) -> jax.Array:
    if not self.tied:
      return _dense(self.vocab_size, "output", self.dtype)(hidden_BxLxF).astype(jnp.float32)
    bias = self.param("output_bias", nn.initializers.zeros, (self.vocab_size,))
    logits = jnp.einsum("blf,vf->blv", hidden_BxLxF, embedding_VxF.astype(hidden_BxLxF.dtype),
                        preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32) * hidden_BxLxF.shape[-1] ** -0.5 + bias


class SelfPretrainingModel(nn.Module):
  """The task's encoder pretrained on the task's own token sequences; returns `{"logits", "targets", "weights"}`.

  `token_keys`: (tokens key, mask key) pairs of the batch, e.g. `(("inputs", "mask"),)` or Retrieval's two
  documents; every pair goes through the one encoder (stacked along the batch). The encoder must have
  `sequence_output=True` (same parameters as the task's pooled encoder) and, for "causal", `causal=True`.

  objective "masked": each real token (mask True) is selected with probability `mask_rate`; a selected token is
    replaced by `mask_token` (80%), a uniformly random token (10%) or kept (10%), and the loss is on the selected
    positions only, so padding is never masked and never predicted. The selection is drawn from the `dropout` rng
    stream in training (a fresh draw per step, folded from the step, so resumed runs draw the same) and from a fixed
    key in evaluation (the same corruption at every evaluation, so validation losses compare across steps).
  objective "causal": the output at position t predicts token t+1; positions where t or t+1 is padding carry no loss.
  `weights` also carry the batch's per-example `weights` (0 for the rows that pad the last evaluation batch).
  """

  encoder: Encoder
  vocab_size: int
  token_keys: tuple[tuple[str, str], ...] = (("inputs", "mask"),)
  objective: str = "masked"
  mask_rate: float = 0.15
  mask_token: int = 0
  tie_embeddings: bool = True

  def _corrupt(self, tokens_BxL: jax.Array, real_BxL: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    key = self.make_rng("dropout") if train and self.has_rng("dropout") else jax.random.key(0)
    select_key, kind_key, random_key = jax.random.split(key, 3)
    selected_BxL = jax.random.bernoulli(select_key, self.mask_rate, tokens_BxL.shape) & real_BxL
    kind_BxL = jax.random.uniform(kind_key, tokens_BxL.shape)
    random_BxL = jax.random.randint(random_key, tokens_BxL.shape, 0, self.vocab_size, dtype=tokens_BxL.dtype)
    corrupted = jnp.where(selected_BxL & (kind_BxL < _MASK_FRACTION),
                          jnp.asarray(self.mask_token, tokens_BxL.dtype), tokens_BxL)
    corrupted = jnp.where(selected_BxL & (kind_BxL >= _MASK_FRACTION) &
                          (kind_BxL < _MASK_FRACTION + _RANDOM_FRACTION), random_BxL, corrupted)
    return corrupted, selected_BxL

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> dict[str, jax.Array]:
    if self.objective not in OBJECTIVES:
      raise ValueError(f"unknown pretraining objective {self.objective!r}; valid choices: {OBJECTIVES}")
    if not self.encoder.sequence_output or self.encoder.causal != (self.objective == "causal"):
      raise ValueError(f"objective {self.objective!r} needs an encoder with sequence_output=True and "
                       f"causal={self.objective == 'causal'}")
    if not 0 <= self.mask_token < self.vocab_size:
      raise ValueError(f"config.pretrain.mask_token={self.mask_token} is outside the vocabulary [0, "
                       f"{self.vocab_size}); pick a token id below {self.vocab_size}")
    tokens_BxL = jnp.concatenate([batch[k] for k, _ in self.token_keys], axis=0).astype(jnp.int32)
    real_BxL = jnp.concatenate([jnp.ones(batch[k].shape, bool) if batch.get(m) is None else batch[m].astype(bool)
                                for k, m in self.token_keys], axis=0)
    if self.objective == "masked":
      inputs_BxL, weights_BxL = self._corrupt(tokens_BxL, real_BxL, train)
      targets_BxL = tokens_BxL
    else:
      inputs_BxL = tokens_BxL
      targets_BxL = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros_like(tokens_BxL[:, :1])], axis=1)
      weights_BxL = real_BxL & jnp.concatenate([real_BxL[:, 1:], jnp.zeros_like(real_BxL[:, :1])], axis=1)
    hidden_BxLxF = self.encoder(inputs_BxL, real_BxL, train=train)
    embedding = self.encoder.variables["params"]["embed"]["embedding"] if self.tie_embeddings else None
    logits = TokenPredictionHead(self.vocab_size, self.tie_embeddings, dtype=self.encoder.compute_dtype,
                                 name="pretrain_head")(hidden_BxLxF, embedding)
    weights = weights_BxL.astype(jnp.float32)
    if batch.get("weights") is not None:
      weights = weights * jnp.tile(batch["weights"].astype(jnp.float32), len(self.token_keys))[:, None]
    return {"logits": logits, "targets": targets_BxL.astype(jnp.int32), "weights": weights}
