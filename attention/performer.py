"""Performer FAVOR+ (Choromanski et al., 2021): positive orthogonal random features for the softmax kernel.

`kernel="softmax"`: `phi(x) = exp(w_j·x' - |x'|^2/2) / sqrt(M)` with `x' = x / d^(1/4)`, so that
`E[phi(q)·phi(k)] = exp(q·k / sqrt(d))`, the softmax kernel; `kernel="relu"`: the generalized kernel
`phi(x) = relu(w_j·x') / sqrt(M)` (plus a small floor). The `M = num_features` rows `w_j` are blocks of `d`
orthogonal directions with chi-distributed norms (orthogonal random features), or iid Gaussian with
`orthogonal=False`; one matrix is shared by all heads, as in the paper's code.

Numerical stabilisation (the paper's max subtraction), exact up to float rounding: each query's features are divided
by their max (a factor that cancels between numerator and normalizer). Keys are shifted by the max over features and
all real positions of the sequence (per head) in the non-causal case, as the paper does; one factor for every key, so
it cancels too. In causal mode that global max would make position t depend on later keys, and decoding could not
know it, so keys are not shifted there: the `-|x'|^2/2` term already bounds the exponent by `|w_j|^2/2 ~ d/2`, finite
in the float32 accumulation for head dims up to 128. Unlike the published FAVOR+ code, no epsilon is added to the
features: after the max-shift an additive 1e-6 is not a common factor and weighs up to ~10% of small key features
(a ~2% output deviation at init-scale inputs). The only epsilon is the normalizer's (`phi(q)·z + eps`), and it is
`NORMALIZER_EPS = 1e-18`, not the kernels' 1e-6: the shifts make `phi(q)·z` as small as ~1e-6 at init scale, where
1e-6 would be a 50% error; 1e-18 only keeps a query with no real key at 0 (0 / eps) with finite gradients (eps^-2
stays within float32). Keys more than ~87 nats below the sequence's largest key underflow to 0.

Features are a non-trainable variable (`attention_state/projection`), drawn at init from the `params` rng; in
training they are redrawn from the `attention` rng stream every `feature_redraw_interval` calls (0 = never), counted
in `attention_state/calls`. `dropout_rate` has no attention weights to act on and is ignored.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention import random_features
from attention.recurrent import RecurrentLayer
from attention.registry import register
from attention.ranges import Integer, OneOf
from kernels.linear_attention import DEFAULT_EPS

KERNELS = ("softmax", "relu")
# The softmax kernel's normalizer epsilon (see the module docstring): negligible next to any real `phi(q)·z`.
NORMALIZER_EPS = 1e-18
STATE = "attention_state"


def gaussian_orthogonal_random_matrix(key: jax.Array, num_features: int, dim: int,
                                      orthogonal: bool = True) -> jax.Array:
  """`[num_features, dim]` random projection: stacked blocks of orthonormal rows (Gram-Schmidt of Gaussian matrices),
  each row rescaled by the norm of an independent Gaussian vector so its length is distributed as for iid Gaussian
  rows. No LAPACK QR: its batched CPU custom call can deadlock the compiled step (see `random_features`)."""
  return random_features.orthogonal_random_matrix(key, num_features, dim, orthogonal)


def softmax_features(x_BxLxHxD: jax.Array, projection_MxD: jax.Array, *, is_query: bool,
                     key_mask_BxL: jax.Array | None = None, global_key_max: bool = False) -> jax.Array:
  """Positive random features of the softmax kernel, `[B, L, H, M]`, in float32."""
  x = x_BxLxHxD.astype(jnp.float32) * x_BxLxHxD.shape[-1] ** -0.25
  proj_BxLxHxM = jnp.einsum("blhd,md->blhm", x, projection_MxD)
  sq_norm = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  if is_query:
    shift = jnp.max(proj_BxLxHxM, axis=-1, keepdims=True)
  elif global_key_max:
    masked = proj_BxLxHxM if key_mask_BxL is None else jnp.where(key_mask_BxL[:, :, None, None], proj_BxLxHxM,
                                                                 -jnp.inf)
    shift = jnp.max(masked - sq_norm, axis=(1, 3), keepdims=True)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)  # a fully padded sequence
  else:
    shift = 0.0
  # The shift only rescales; gradients must not flow through it (nor, in causal mode, from the future).
  shift = jax.lax.stop_gradient(shift)
  num_features = projection_MxD.shape[0]
  # No additive epsilon: it would not cancel with the shift (see the module docstring); the normalizer has its own.
  return jnp.exp(proj_BxLxHxM - sq_norm - shift) / math.sqrt(num_features)


def relu_features(x_BxLxHxD: jax.Array, projection_MxD: jax.Array) -> jax.Array:
  x = x_BxLxHxD.astype(jnp.float32) * x_BxLxHxD.shape[-1] ** -0.25
  proj = jnp.einsum("blhd,md->blhm", x, projection_MxD)
  return (jax.nn.relu(proj) + 1e-3) / math.sqrt(projection_MxD.shape[0])


@register("performer")
class Performer(RecurrentLayer):
  """Attributes: kernel ("softmax" | "relu"), num_features (M), orthogonal, feature_redraw_interval (training calls
  between redraws, 0 = fixed features), chunk_size and implementation of `kernels.linear_attention`."""

  kernel: str = "softmax"
  num_features: int = 256
  orthogonal: bool = True
  feature_redraw_interval: int = 1000
  chunk_size: int = 64
  implementation: str | None = None
  option_ranges = {"kernel": OneOf(KERNELS), "num_features": Integer(1), "feature_redraw_interval": Integer(0)}

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    q, k, v = self.project_qkv(x)
    head_dim = q.shape[-1]
    draw = lambda key: gaussian_orthogonal_random_matrix(key, self.num_features, head_dim,  # noqa: E731
                                                         self.orthogonal)
    projection = self.variable(STATE, "projection", lambda: draw(self.make_rng("params")))
    calls = self.variable(STATE, "calls", lambda: jnp.zeros((), jnp.int32))
    if not deterministic and self.feature_redraw_interval > 0 and self.is_mutable_collection(STATE) \
        and not self.is_initializing():
      redraw = (calls.value > 0) & (calls.value % self.feature_redraw_interval == 0)
      # cond, not where: the draw (a Gram-Schmidt loop over head_dim rows) runs only on the steps that redraw.
      key, current = self.make_rng("attention"), projection.value
      projection.value = jax.lax.cond(redraw, lambda: draw(key), lambda: current)
      calls.value = calls.value + 1

    if self.kernel == "softmax":
      phi_q = softmax_features(q, projection.value, is_query=True)
      phi_k = softmax_features(k, projection.value, is_query=False, key_mask_BxL=mask,
                               global_key_max=not self.causal)
    else:
      phi_q, phi_k = relu_features(q, projection.value), relu_features(k, projection.value)
    # The relu kernel's features have a floor, so its normalizer keeps the kernels' default epsilon.
    eps = NORMALIZER_EPS if self.kernel == "softmax" else DEFAULT_EPS
    y = self.linear_mix(phi_q, phi_k, v, mask, normalize=True, chunk_size=self.chunk_size,
                        implementation=self.implementation, eps=eps)
    return self.project_out(y, x.shape[-1])
