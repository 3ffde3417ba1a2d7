"""The base of the causal language-model tasks (WikiText-2, MQAR): the model, the masked token loss, the batch layout."""

from __future__ import annotations

from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lra.models import encoder_from_config
from lra.models.language_model import LanguageModel
from lra.tasks.base import Metrics, Task


def causal_lm_model(config: ml_collections.ConfigDict, vocab_size: int) -> LanguageModel:
  """A causal encoder over every position (no pooling) with the LM head (tied embeddings unless the config says)."""
  encoder = encoder_from_config(config.model, vocab_size=vocab_size, max_length=config.data.max_length, causal=True,
                                pooling="none")
  return LanguageModel(encoder=encoder, vocab_size=vocab_size, tie_embeddings=config.model.get("tie_embeddings", True))


def token_loss_and_metrics(logits_BxLxV: jax.Array, batch, positions_BxL: jax.Array) -> tuple[jax.Array, Metrics]:
  """Mean cross-entropy and accuracy over the positions marked in `positions_BxL` (times the batch's per-example
  `weights`, which are 0 for padding examples of the last eval batch); sums and counts for exact split metrics."""
  weights = positions_BxL.astype(jnp.float32)
  if "weights" in batch:
    weights = weights * batch["weights"][:, None]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32), batch["targets"])
  correct = (jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"]).astype(jnp.float32)
  count = jnp.sum(weights)
  total = jnp.sum(nll * weights)
  return total / jnp.maximum(count, 1.0), {"loss": (total, count), "accuracy": (jnp.sum(correct * weights), count)}


class LanguageModelTask(Task):
  """Next-token prediction: `inputs` and `targets` token ids `[L]` (targets = inputs shifted by one) with the padding
  `mask`; a causal encoder with the LM head; loss and accuracy over `loss_positions`. A subclass sets `vocab_size` (a
  class attribute or a property) and `build_dataset`; `length` is `config.data.max_length`."""

  vocab_size: ClassVar[int]

  @property
  def length(self) -> int:
    """Tokens per example."""
    return self.config.data.max_length

  def input_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    tokens = jax.ShapeDtypeStruct((self.length,), np.int32)
    return {"inputs": tokens, "targets": tokens, "mask": jax.ShapeDtypeStruct((self.length,), np.bool_)}

  def model(self) -> LanguageModel:
    return causal_lm_model(self.config, self.vocab_size)

  def loss_positions(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """`[B, L]` bool: the positions the loss and metrics count (default: every real token)."""
    return batch["mask"]

  def loss_and_metrics(self, logits_BxLxV: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
    return token_loss_and_metrics(logits_BxLxV, batch, self.loss_positions(batch))
