"""Causal language model: the encoder run causally over every position, then next-token logits."""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lra.models.encoder import Encoder


class LanguageModel(nn.Module):
  """`batch["inputs"] [B, L]` -> float32 logits `[B, L, vocab]`. The encoder must be causal with pooling "none".

  tie_embeddings: the output layer is the transposed token embedding (plus a bias), as Press & Wolf (2017),
    scaled by 1/sqrt(emb_dim): the encoder's embedding is initialised with unit variance (as LRA), so unscaled logits
    would start with a standard deviation of ~sqrt(emb_dim) and a loss far above log(vocab).
  """

  encoder: Encoder
  vocab_size: int
  tie_embeddings: bool = True

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    if not self.encoder.causal or self.encoder.pooling != "none":
      raise ValueError(f"LanguageModel needs a causal encoder with pooling='none', got causal={self.encoder.causal}, "
                       f"pooling={self.encoder.pooling!r}")
    hidden_BxLxF = self.encoder(batch["inputs"], batch.get("mask"), train=train)
    if self.tie_embeddings:
      embedding_VxF = self.encoder.variables["params"]["embed"]["embedding"]
      bias = self.param("output_bias", nn.initializers.zeros, (self.vocab_size,))
      scale = hidden_BxLxF.shape[-1] ** -0.5
      # float32 logits: the softmax over the vocabulary and the loss accumulate in float32.
      logits = jnp.einsum("blf,vf->blv", hidden_BxLxF, embedding_VxF.astype(hidden_BxLxF.dtype),
                          preferred_element_type=jnp.float32)
      return logits.astype(jnp.float32) * scale + bias
    return nn.Dense(self.vocab_size, dtype=self.encoder.compute_dtype, param_dtype=jnp.float32, name="output")(
        hidden_BxLxF).astype(jnp.float32)
