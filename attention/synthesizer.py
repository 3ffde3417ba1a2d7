"""Synthesizer (Tay et al., 2021): attention weights synthesized without (or besides) query-key dot products.

`y = softmax(B) G(x)` with `G` the `value` projection and the logits `B: [L, L]` per head from `mode`:
- `"dense"`: a per-token two-layer MLP, `B_i = W2 relu(W1 x_i + b1) + b2`, maps each token to logits over the
  `max_length` key positions (per head: hidden width `head_dim`, then `head_dim -> max_length`);
- `"random"`: a `[max_length, max_length]` logit matrix per head, independent of the input; learned, or fixed at its
  random initialisation with `trainable_random=False` (the paper's "fixed random", kept in the non-trainable
  `attention_state` collection so that neither the optimizer nor weight decay moves it);
- `"factorized"`: factorized random, `B = R1 R2^T` with `R1, R2: [max_length, factor_k]` per head (also fixed with
  `trainable_random=False`).
`mix_dot_product=True` mixes the synthetic logits with ordinary `q k^T / sqrt(d)` logits (the paper's mixture,
"R+V"/"D+V"): `softmax(a_1 B + a_2 q k^T/sqrt(d))` with `a = softmax(mix_logits)`, learned, starting at 0.5/0.5.

Padded keys are masked out of the softmax; `causal=True` masks the logits above the diagonal (a dense row depends only
on its own token, a random row on nothing, so both stay causal). Inputs shorter than `max_length` use the leading
rows/columns; `max_length=0` (the default) takes the length of the input at init (see `attention.linformer`).

Defaults follow the paper (`mode="dense"`, trainable, no mixing); `factor_k=32` is the authors' LRA code value. The
LRA ListOps runs used `synthesizer_mode="factorized_random"` without dot products (`ignore_dot_product=True`).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import AttentionLayer, default_kernel_init
from attention.linformer import resolve_max_length
from attention.registry import register
from attention.ranges import Integer, OneOf
from kernels.common import MASK_VALUE
from kernels.softmax import causal_mask

STATE = "attention_state"
per_head_init = nn.initializers.xavier_uniform(batch_axis=(0,))  # the head axis is not part of fan-in/fan-out


def _dense_logits(layer: "Synthesizer", x: jax.Array, n: int) -> jax.Array:
  """`[B, H, L, n]`: each token's MLP output over the `n` key positions."""
  hidden = layer.dense((layer.num_heads, layer.head_dim(x)), "synth_hidden", kernel_init=default_kernel_init)
  hidden_BxLxHxD = nn.relu(hidden(x))
  kernel = layer.param("synth_out_kernel", per_head_init, (layer.num_heads, layer.head_dim(x), n), jnp.float32)
  bias = layer.param("synth_out_bias", nn.initializers.zeros, (layer.num_heads, n), jnp.float32)
  return jnp.einsum("blhd,hdn->bhln", hidden_BxLxHxD.astype(jnp.float32), kernel) + bias[None, :, None, :]


def _variable(layer: "Synthesizer", name: str, shape: tuple[int, ...]) -> jax.Array:
  """A learned parameter, or a fixed random matrix in `attention_state` drawn from the `params` rng at init."""
  if layer.trainable_random:
    return layer.param(name, per_head_init, shape, jnp.float32)
  return layer.variable(STATE, name, lambda: per_head_init(layer.make_rng("params"), shape, jnp.float32)).value


def _random_logits(layer: "Synthesizer", x: jax.Array, n: int) -> jax.Array:
  return _variable(layer, "random", (layer.num_heads, n, n))[None]


def _factorized_logits(layer: "Synthesizer", x: jax.Array, n: int) -> jax.Array:
  r1 = _variable(layer, "random_1", (layer.num_heads, n, layer.factor_k))
  r2 = _variable(layer, "random_2", (layer.num_heads, n, layer.factor_k))
  return jnp.einsum("hik,hjk->hij", r1, r2)[None]


# mode -> (logits function, the variable whose shape records max_length, its length axis)
MODES: dict[str, tuple[Callable[["Synthesizer", jax.Array, int], jax.Array], str, int]] = {
    "dense": (_dense_logits, "synth_out_kernel", -1),
    "random": (_random_logits, "random", -1),
    "factorized": (_factorized_logits, "random_1", -2),
}


@register("synthesizer")
class Synthesizer(AttentionLayer):
  """Attributes: mode ("dense" | "random" | "factorized"), max_length (0 = the input length at init), factor_k (rank
  of the factorized logits), trainable_random (random/factorized logits learned or fixed), mix_dot_product."""

  mode: str = "dense"
  max_length: int = 0
  factor_k: int = 32
  trainable_random: bool = True
  mix_dot_product: bool = False
  option_ranges = {"mode": OneOf(tuple(MODES)), "max_length": Integer(0), "factor_k": Integer(1)}

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    length = x.shape[1]
    logits_fn, probe, axis = MODES[self.mode]
    collection = "params" if self.mode == "dense" or self.trainable_random else STATE
    n = resolve_max_length(self, self.max_length, length, collection, probe, axis)
    logits_BxHxLxL = logits_fn(self, x, n)[:, :, :length, :length].astype(jnp.float32)

    v = self.project(x, "value")
    if self.mix_dot_product:
      q, k = self.project(x, "query"), self.project(x, "key")
      dots_BxHxLxL = jnp.einsum("blhd,bshd->bhls", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
      mix = jax.nn.softmax(self.param("mix_logits", nn.initializers.zeros, (2,), jnp.float32))
      logits_BxHxLxL = mix[0] * logits_BxHxLxL + mix[1] * dots_BxHxLxL

    allowed = jnp.ones((1, 1, 1, length), bool) if mask is None else mask[:, None, None, :].astype(bool)
    if self.causal:
      allowed = allowed & causal_mask(length, length)
    weights_BxHxLxL = jax.nn.softmax(jnp.where(allowed, logits_BxHxLxL, MASK_VALUE), axis=-1)
    weights_BxHxLxL = self.attention_dropout(weights_BxHxLxL, deterministic)
    y = jnp.einsum("bhls,bshd->blhd", weights_BxHxLxL.astype(v.dtype), v)
    return self.project_out(y, x.shape[-1])
