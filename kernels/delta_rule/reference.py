"""The token-by-token delta rule: the ground truth in tests, and the one-step decode.

`S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `o_t = S_t^T q_t`, with `S [K, V]` per batch row
and head (the transpose of the papers' `S_{t-1}(I - beta k k^T) + beta v k^T` in `[V, K]`): DeltaNet (alpha = 1) and
Gated DeltaNet (`alpha_t = exp(g_t)`, g `[B, L, H]`). Equivalently `S_t = alpha S + beta k (v - alpha S^T k)^T`: the
state is corrected toward `v_t` along `k_t` by the prediction error. A new segment starts from a zero state. States
are float32 (float64 for float64 inputs); the output has v's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.gated_linear.reference import state_dtype


def delta_rule_step(state_BxHxKxV: jax.Array, q_BxHxK: jax.Array, k_BxHxK: jax.Array, v_BxHxV: jax.Array,
                    beta_BxH: jax.Array, log_decay_BxH: jax.Array | None = None, *,
                    key_mask_B: jax.Array | None = None):
  """One decoding step of the (gated) delta rule; a step whose `key_mask_B` is False leaves the state unchanged.
  Returns `(state, out [B, H, V])`."""
  dt = state_BxHxKxV.dtype
  q, k, v, beta = (x.astype(dt) for x in (q_BxHxK, k_BxHxK, v_BxHxV, beta_BxH))
  g = jnp.zeros_like(beta) if log_decay_BxH is None else log_decay_BxH.astype(dt)
  if key_mask_B is not None:  # beta = 0 and no decay: the token is dropped from the state
    m = key_mask_B.astype(bool)[:, None]
    beta, g = jnp.where(m, beta, 0.0), jnp.where(m, g, 0.0)
  state = jnp.exp(g)[..., None, None] * state_BxHxKxV
  error_BxHxV = v - jnp.einsum("bhk,bhkv->bhv", k, state)
  state = state + beta[..., None, None] * k[..., :, None] * error_BxHxV[..., None, :]
  return state, jnp.einsum("bhk,bhkv->bhv", q, state).astype(v_BxHxV.dtype)


def delta_rule_reference(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxV: jax.Array, beta_BxLxH: jax.Array,
                         log_decay_BxLxH: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
                         initial_state: jax.Array | None = None):
  """The recurrence scanned token by token. Returns `(out [B, L, H, V], final state [B, H, K, V])`."""
  b, length, h, dk = q_BxLxHxK.shape
  dt = state_dtype(q_BxLxHxK, k_BxLxHxK, v_BxLxHxV)
  state = jnp.zeros((b, h, dk, v_BxLxHxV.shape[-1]), dt) if initial_state is None else initial_state.astype(dt)
  g = jnp.zeros(beta_BxLxH.shape, dt) if log_decay_BxLxH is None else log_decay_BxLxH
  seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids
  prev = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)

  def step(state, inputs):
    q, k, v, beta, g, reset = inputs
    state = jnp.where(reset[:, None, None, None], 0.0, state)
    return delta_rule_step(state, q, k, v, beta, g)

  time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
  state, out = jax.lax.scan(step, state, tuple(time_major(x) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, beta_BxLxH,
                                                                       g, seg != prev)))
  return jnp.moveaxis(out, 0, 1).astype(v_BxLxHxV.dtype), state


__all__ = ["delta_rule_reference", "delta_rule_step"]
