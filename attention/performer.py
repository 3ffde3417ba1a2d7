"""Performer FAVOR+ (Choromanski et al., 2021): positive orthogonal random features for the softmax kernel.

`kernel="softmax"`: `phi(x) = exp(w_j·x' - |x'|^2/2) / sqrt(M)` with `x' = x / d^(1/4)`, so that
`E[phi(q)·phi(k)] = exp(q·k / sqrt(d))`, the softmax kernel; `kernel="relu"`: the generalized kernel
`phi(x) = relu(w_j·x') / sqrt(M)` (plus a small floor). The `M = num_features` rows `w_j` are blocks of `d`
orthogonal directions with chi-distributed norms (orthogonal random features), or iid Gaussian with
`orthogonal=False`; one matrix is shared by all heads, as in the paper's code.

Numerical stabilisation (the paper's max subtraction): each query's features are divided by their max (a factor that
cancels between numerator and normalizer). Keys are shifted by the max over features and all real positions in the
non-causal case, as the paper does. In causal mode that global max would make position t depend on later keys, and
decoding could not know it, so keys are not shifted there: the `-|x'|^2/2` term already bounds the exponent by
`|w_j|^2/2 ~ d/2`, finite in the float32 accumulation for head dims up to 128.

Features are a non-trainable variable (`attention_state/projection`), drawn at init from the `params` rng; in
training they are redrawn from the `attention` rng stream every `feature_redraw_interval` calls (0 = never), counted
in `attention_state/calls`. `dropout_rate` has no attention weights to act on and is ignored.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import AttentionLayer
from attention.recurrent import linear_mix
from attention.registry import register

KERNELS = ("softmax", "relu")
STATE = "attention_state"


def gaussian_orthogonal_random_matrix(key: jax.Array, num_features: int, dim: int,
                                      orthogonal: bool = True) -> jax.Array:
  """`[num_features, dim]` random projection: stacked blocks of orthonormal rows (QR of Gaussian matrices), each row
  rescaled by the norm of an independent Gaussian vector so its length is distributed as for iid Gaussian rows."""
  block_key, norm_key = jax.random.split(key)
  if orthogonal:
    num_blocks = math.ceil(num_features / dim)
    gaussian = jax.random.normal(block_key, (num_blocks, dim, dim))
    q_blocks, _ = jnp.linalg.qr(gaussian)  # columns orthonormal
    rows = jnp.swapaxes(q_blocks, 1, 2).reshape(num_blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim)), axis=1)
    return rows * norms[:, None]
  return jax.random.normal(block_key, (num_features, dim))


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
  return (jnp.exp(proj_BxLxHxM - sq_norm - shift) + 1e-6) / math.sqrt(num_features)


def relu_features(x_BxLxHxD: jax.Array, projection_MxD: jax.Array) -> jax.Array:
  x = x_BxLxHxD.astype(jnp.float32) * x_BxLxHxD.shape[-1] ** -0.25
  proj = jnp.einsum("blhd,md->blhm", x, projection_MxD)
  return (jax.nn.relu(proj) + 1e-3) / math.sqrt(projection_MxD.shape[0])


@register("performer")
class Performer(AttentionLayer):
  """Attributes: kernel ("softmax" | "relu"), num_features (M), orthogonal, feature_redraw_interval (training calls
  between redraws, 0 = fixed features), chunk_size and implementation of `kernels.linear_attention`."""

  kernel: str = "softmax"
  num_features: int = 256
  orthogonal: bool = True
  feature_redraw_interval: int = 1000
  chunk_size: int = 64
  implementation: str | None = None

  supports_decode = True

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    if self.kernel not in KERNELS:
      raise ValueError(f"unknown performer kernel {self.kernel!r}; valid choices: {KERNELS}")
    if self.num_features < 1:
      raise ValueError(f"num_features must be >= 1, got {self.num_features}")
    q, k, v = self.project_qkv(x)
    head_dim = q.shape[-1]
    draw = lambda key: gaussian_orthogonal_random_matrix(key, self.num_features, head_dim,  # noqa: E731
                                                         self.orthogonal)
    projection = self.variable(STATE, "projection", lambda: draw(self.make_rng("params")))
    calls = self.variable(STATE, "calls", lambda: jnp.zeros((), jnp.int32))
    if not deterministic and self.feature_redraw_interval > 0 and self.is_mutable_collection(STATE) \
        and not self.is_initializing():
      redraw = (calls.value > 0) & (calls.value % self.feature_redraw_interval == 0)
      projection.value = jnp.where(redraw, draw(self.make_rng("attention")), projection.value)
      calls.value = calls.value + 1

    if self.kernel == "softmax":
      phi_q = softmax_features(q, projection.value, is_query=True)
      phi_k = softmax_features(k, projection.value, is_query=False, key_mask_BxL=mask,
                               global_key_max=not self.causal)
    else:
      phi_q, phi_k = relu_features(q, projection.value), relu_features(k, projection.value)
    y = linear_mix(self, phi_q, phi_k, v, mask, causal=self.causal, normalize=True, chunk_size=self.chunk_size,
                   implementation=self.implementation, decode=self.decode)
    return self.project_out(y.astype(x.dtype), x.shape[-1])
