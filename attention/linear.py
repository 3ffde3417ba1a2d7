"""Linear attention (Katharopoulos et al., 2020): softmax replaced by a feature map, `phi(q) (phi(k)^T v)`.

`feature_map="elu"` is elu(x)+1 (the paper), `"relu"` is relu(x) (with a small floor so the normalizer stays
positive). Cost and memory are linear in length (`kernels.linear_attention`); decoding keeps a fixed-size state.
`dropout_rate` is accepted for the common interface but has nothing to act on: there are no attention weights.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.recurrent import RecurrentLayer
from attention.registry import register
from attention.ranges import OneOf

FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "elu": lambda x: jax.nn.elu(x) + 1.0,
    # The floor keeps phi(q)·z > 0 when every feature of a query is negative.
    "relu": lambda x: jax.nn.relu(x) + 1e-3,
}


@register("linear")
class LinearAttention(RecurrentLayer):
  """Attributes: feature_map ("elu" | "relu"), chunk_size and implementation of `kernels.linear_attention`."""

  feature_map: str = "elu"
  chunk_size: int = 64
  implementation: str | None = None
  option_ranges = {"feature_map": OneOf(tuple(FEATURE_MAPS))}

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    q, k, v = self.project_qkv(x)
    # Features in float32: the normalizer phi(q)·z sums over the whole sequence.
    phi = lambda t: FEATURE_MAPS[self.feature_map](t.astype(jnp.float32))  # noqa: E731
    y = self.linear_mix(phi(q), phi(k), v, mask, normalize=True, chunk_size=self.chunk_size,
                        implementation=self.implementation)
    return self.project_out(y, x.shape[-1])
