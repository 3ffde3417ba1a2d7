"""Additive attention (Bahdanau et al., 2015; Luong et al., 2015's "concat"), multi-head.

Per head h, with q = query(x), k = key(x) (the shared projections, so a softmax checkpoint's tree fits):

* `form="bahdanau"`: `score(q, k) = v_aᵀ tanh(W_a q + U_a k)` with `W_a, U_a: [D, A]` (`w_a`, `u_a`), `v_a: [A]`;
* `form="concat"`: `score(q, k) = v_aᵀ tanh(W_a [q; k])` with one `W_a: [2D, A]` (`w_a`) over the concatenation.

The two forms are the same function family (W_a [q; k] = W_top q + W_bottom k); they differ in parameter layout and
initialisation (fan-in 2D vs D), as the two papers wrote them. A = `attention_dim` (None: the head dim). The scores
then go through a softmax over the allowed keys (padding, causal), dropout, and a weighted sum of values.

Memory: the score has an `[L, S, A]` intermediate per batch row and head (tanh of every query-key pair). It is
computed in key chunks of `chunk_size`: at most `B * H * L * chunk_size * A` elements of it exist at once, and each
chunk is rematerialized in the backward pass (`jax.checkpoint`), so neither pass holds it whole. What remains
quadratic is the `[B, H, L, S]` float32 score and weight matrices (as in the reference softmax). For L = S = 4096,
A = 32, one head, float32: the whole intermediate would be 2 GiB, a 128-key chunk 64 MiB, the scores 64 MiB; a
training step (value and gradient) compiles to about 330 MiB of temporaries, a few copies of the scores
(checked by compiled memory in tests/attention/test_additive_multiplicative.py).

Positions: ALiBi biases (`positions="alibi"`) add to the scores; RoPE is refused (a rotation is not relative under
tanh). Decoding keeps the projected keys `U_a k` and the values of every position in a ring cache of the maximum length.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention import positions as positions_lib
from attention.base import AttentionLayer
from attention.ranges import Integer, OneOf
from attention.registry import register
from kernels.common import MASK_VALUE
from kernels.softmax import causal_mask

FORMS = ("bahdanau", "concat")


def additive_scores(qa_BxLxHxA: jax.Array, ka_BxSxHxA: jax.Array, v_a_HxA: jax.Array, *,
                    chunk_size: int) -> jax.Array:
  """float32 `[B, H, L, S]` scores `v_aᵀ tanh(qa + ka)`, in key chunks of `chunk_size` (see the module docstring)."""
  batch, length, heads, dim = qa_BxLxHxA.shape
  keys = ka_BxSxHxA.shape[1]
  chunk = min(chunk_size, keys)
  num_chunks = -(-keys // chunk)
  pad = num_chunks * chunk - keys
  ka = jnp.pad(ka_BxSxHxA, ((0, 0), (0, pad), (0, 0), (0, 0)))
  ka_NxBxCxHxA = ka.reshape(batch, num_chunks, chunk, heads, dim).swapaxes(0, 1)

  @jax.checkpoint  # recompute each chunk's tanh in the backward pass instead of storing all of them
  def chunk_scores(ka_BxCxHxA: jax.Array) -> jax.Array:
    hidden_BxLxCxHxA = jnp.tanh(qa_BxLxHxA[:, :, None] + ka_BxCxHxA[:, None])
    return jnp.einsum("blcha,ha->bhlc", hidden_BxLxCxHxA, v_a_HxA.astype(hidden_BxLxCxHxA.dtype),
                      preferred_element_type=jnp.float32)

  scores_NxBxHxLxC = jax.lax.map(chunk_scores, ka_NxBxCxHxA)
  scores_BxHxLxS = jnp.moveaxis(scores_NxBxHxLxC, 0, 3).reshape(batch, heads, length, num_chunks * chunk)
  return scores_BxHxLxS[..., :keys]


def allowed_keys(length: int, keys: int, key_mask_BxS: jax.Array | None, causal: bool) -> jax.Array:
  """bool, broadcasting to `[B, H, L, S]`: real keys, and (causal) keys not after the query (queries aligned to the
  last keys)."""
  allowed = jnp.ones((1, 1, 1, 1), bool) if key_mask_BxS is None else key_mask_BxS[:, None, None, :].astype(bool)
  if causal:
    allowed = allowed & causal_mask(length, keys)[None, None]
  return allowed


def softmax_weights(scores_BxHxLxS: jax.Array, allowed: jax.Array) -> jax.Array:
  """float32 softmax over the allowed keys; a row with none allowed is uniform (finite), as the reference softmax."""
  return jax.nn.softmax(jnp.where(allowed, scores_BxHxLxS.astype(jnp.float32), MASK_VALUE), axis=-1)


def mix_values(weights_BxHxLxS: jax.Array, v_BxSxHxD: jax.Array) -> jax.Array:
  out = jnp.einsum("bhls,bshd->blhd", weights_BxHxLxS.astype(v_BxSxHxD.dtype), v_BxSxHxD,
                   preferred_element_type=jnp.float32)
  return out.astype(v_BxSxHxD.dtype)


class ScoredAttention(AttentionLayer):
  """Shared machinery of layers that compute their own `[B, H, L, S]` scores (additive, multiplicative): projections,
  a full ring cache for decoding, padding / causal masks, ALiBi biases, softmax, dropout, output projection.

  Subclasses define `prepare(q, k)` (-> what the score needs of queries and of keys; the key part is cached) and
  `scores(q_part, k_part)`. The weights before dropout are sown as `intermediates/attention_weights`.
  """

  supports_decode = True

  def prepare(self, q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, offset: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    raise NotImplementedError

  def scores(self, q_part: jax.Array, k_part: jax.Array) -> jax.Array:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    q, k, v = self.project_qkv(x)
    offset = positions_lib.decode_offset(self, "cached") if self.decode else 0
    q_part, k_part = self.prepare(q, k, offset)
    step = self.ring_cache("cached", x.shape[1], {"key": k_part, "value": v}, mask) if self.decode else None
    if step is not None:
      cached, valid_BxS, t = step
      k_part, v = cached["key"], cached["value"]
      allowed = valid_BxS[:, None, None, :]
      query_positions = t + jnp.arange(x.shape[1])
    else:
      allowed = allowed_keys(x.shape[1], x.shape[1], mask, self.causal)
      query_positions = jnp.arange(x.shape[1])
    scores_BxHxLxS = self.scores(q_part, k_part)
    if self.positions == "alibi":
      slopes = positions_lib.alibi_slopes(self.num_heads)
      scores_BxHxLxS = scores_BxHxLxS + positions_lib.alibi_bias(slopes, query_positions, jnp.arange(k_part.shape[1]))
    weights_BxHxLxS = softmax_weights(scores_BxHxLxS, allowed)
    # The weights before dropout, for scripts/plot_attention.py (kept only with mutable=["intermediates"]).
    self.sow("intermediates", "attention_weights", weights_BxHxLxS)
    weights_BxHxLxS = self.attention_dropout(weights_BxHxLxS, deterministic)
    return self.project_out(mix_values(weights_BxHxLxS, v), x.shape[-1])


@register("additive")
class AdditiveAttention(ScoredAttention):
  """Multi-head additive attention (module docstring).

  Attributes (besides the common ones of `AttentionLayer`):
    form: "bahdanau" (`v_aᵀ tanh(W_a q + U_a k)`) or "concat" (`v_aᵀ tanh(W_a [q; k])`).
    attention_dim: A, the width of the tanh layer per head; None means the head dim.
    chunk_size: keys per chunk of the `[L, chunk, A]` intermediate (memory, not values).
  """

  form: str = "bahdanau"
  attention_dim: int | None = None
  chunk_size: int = 128
  option_ranges = {"form": OneOf(FORMS), "attention_dim": Integer(1, allow_none=True), "chunk_size": Integer(1)}

  supported_positions = ("none", "alibi")

  def prepare(self, q_BxLxHxD, k_BxSxHxD, offset):
    del offset
    heads, head_dim = q_BxLxHxD.shape[2:]
    dim = head_dim if self.attention_dim is None else self.attention_dim
    init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    if self.form == "bahdanau":
      w_q = self.param("w_a", init, (heads, head_dim, dim), jnp.float32)
      w_k = self.param("u_a", init, (heads, head_dim, dim), jnp.float32)
    else:
      w_qk = self.param("w_a", init, (heads, 2 * head_dim, dim), jnp.float32)
      w_q, w_k = w_qk[:, :head_dim], w_qk[:, head_dim:]
    dtype = self.compute_dtype
    project = lambda t, w: jnp.einsum("blhd,hda->blha", t, w.astype(dtype)).astype(dtype)  # noqa: E731
    return project(q_BxLxHxD, w_q), project(k_BxSxHxD, w_k)

  def scores(self, qa_BxLxHxA, ka_BxSxHxA):
    heads, dim = qa_BxLxHxA.shape[2:]
    v_a = self.param("v_a", nn.initializers.normal(stddev=dim ** -0.5), (heads, dim), jnp.float32)
    return additive_scores(qa_BxLxHxA, ka_BxSxHxA, v_a, chunk_size=self.chunk_size)
