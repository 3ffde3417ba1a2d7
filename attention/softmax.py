"""Exact softmax attention (Vaswani et al., 2017): the baseline every other variant is compared against."""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import AttentionLayer, causal_mask
from attention.registry import register

Implementation = Literal["reference", "xla", "cudnn"] | None
IMPLEMENTATIONS = ("reference", "xla", "cudnn", None)


def softmax_attention_reference(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array, *,
                                mask: jax.Array | None = None, causal: bool = False, scale: float | None = None,
                                dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """The plain einsum form, softmax in float32. `mask` broadcasts to `[B, H, L, S]` (True = may attend).

  Rows with no allowed key give a uniform average rather than NaN (only fully padded sequences have them).
  """
  scale = q_BxLxHxD.shape[-1] ** -0.5 if scale is None else scale
  scores_BxHxLxS = jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k_BxSxHxD,
                              preferred_element_type=jnp.float32) * scale
  allowed = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask
  if causal:
    allowed = allowed & causal_mask(q_BxLxHxD.shape[1], k_BxSxHxD.shape[1])
  # A large finite negative (not -inf) keeps fully masked rows and their gradients finite.
  scores_BxHxLxS = jnp.where(allowed, scores_BxHxLxS, jnp.finfo(jnp.float32).min)
  weights_BxHxLxS = jax.nn.softmax(scores_BxHxLxS, axis=-1)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights_BxHxLxS.shape)
    weights_BxHxLxS = jnp.where(keep, weights_BxHxLxS / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhls,bshd->blhd", weights_BxHxLxS.astype(v_BxSxHxD.dtype), v_BxSxHxD,
                   preferred_element_type=jnp.float32)
  return out.astype(q_BxLxHxD.dtype)


def softmax_attention(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array, *,
                      mask: jax.Array | None = None, causal: bool = False, scale: float | None = None,
                      implementation: Implementation = None, dropout_rate: float = 0.0,
                      dropout_rng: jax.Array | None = None) -> jax.Array:
  """Softmax attention on `[batch, length, heads, head_dim]` tensors.

  implementation: "reference" (einsum, the ground truth), "xla" / "cudnn" (`jax.nn.dot_product_attention` with that
  implementation), None (`jax.nn.dot_product_attention`'s own choice: cuDNN flash attention on GPU where it applies,
  XLA elsewhere). Attention dropout needs the weights, so it always runs the reference form.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown softmax implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  if implementation == "reference" or (dropout_rate > 0.0 and dropout_rng is not None):
    return softmax_attention_reference(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, mask=mask, causal=causal, scale=scale,
                                       dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  return jax.nn.dot_product_attention(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, mask=mask, is_causal=causal, scale=scale,
                                      implementation=implementation)


@register("softmax")
class SoftmaxAttention(AttentionLayer):
  """Multi-head softmax attention with padding mask, causal mode and a flax-style decode cache.

  Attributes (besides the common ones of `AttentionLayer`):
    implementation: see `softmax_attention`; default None picks the best available on the backend.
  """

  implementation: Implementation = None

  supports_decode = True

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"unknown softmax implementation {self.implementation!r}; valid choices: {IMPLEMENTATIONS}")
    q, k, v = self.project_qkv(x)
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    attend = lambda q, k, v, m, causal: softmax_attention(  # noqa: E731
        q, k, v, mask=m, causal=causal, implementation=self.implementation, dropout_rate=self.dropout_rate,
        dropout_rng=dropout_rng)

    if self.decode and self.has_variable("cache", "cached_key"):
      y = self._decode_step(q, k, v, mask, attend)
    else:
      if self.decode:  # init: allocate the cache for the maximum length given by x.
        self._cache_variables(k, v)
      key_mask = None if mask is None else mask[:, None, None, :]
      y = attend(q, k, v, key_mask, self.causal)
    return self.project_out(y, x.shape[-1])

  def _cache_variables(self, k: jax.Array, v: jax.Array):
    b, length = k.shape[:2]
    return (self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype),
            self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype),
            self.variable("cache", "cached_mask", jnp.zeros, (b, length), bool),
            self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32)))

  def _decode_step(self, q, k, v, mask, attend):
    if q.shape[1] != 1:
      raise ValueError(f"decode step expects one position per call, got length {q.shape[1]}")
    cached_key, cached_value, cached_mask, index = self._cache_variables(k, v)
    i = index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, i, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, i, 0, 0))
    step_mask = jnp.ones((q.shape[0], 1), bool) if mask is None else mask.astype(bool)
    cached_mask.value = jax.lax.dynamic_update_slice(cached_mask.value, step_mask, (0, i))
    index.value = i + 1
    max_length = cached_key.value.shape[1]
    allowed_BxS = cached_mask.value & (jnp.arange(max_length) <= i)[None, :]
    return attend(q, cached_key.value, cached_value.value, allowed_BxS[:, None, None, :], False)
