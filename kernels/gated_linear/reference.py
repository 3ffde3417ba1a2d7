"""The token-by-token recurrence of gated linear attention: the ground truth in tests, and the one-step decode.

`S_t = diag(a_t) S_{t-1} + k_t v_t^T`, `o_t = S_t^T q_t` with `S [K, V]` per batch row and head, `a_t = exp(g_t)` a
decay per head (`g [B, L, H]`: RetNet's fixed gamma_h, Mamba-2's exp(dt A)) or per key dimension (`g [B, L, H, K]`:
GLA). A new segment (`segment_ids[t] != segment_ids[t-1]`) starts from a zero state. States are float32 (float64
when the inputs are: the x64 checks); the output has v's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def state_dtype(*xs: jax.Array) -> jnp.dtype:
  """float32, or float64 when an input is float64 (the x64 ground truth)."""
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def gated_linear_step(state_BxHxKxV: jax.Array, q_BxHxK: jax.Array, k_BxHxK: jax.Array, v_BxHxV: jax.Array,
                      log_decay: jax.Array, *, key_mask_B: jax.Array | None = None):
  """One decoding step: decays the state by `exp(log_decay)` (`[B, H]` or `[B, H, K]`), adds `k_t v_t^T` and reads
  it with `q_t`. A step whose `key_mask_B` is False leaves the state as it was. Returns `(state, out [B, H, V])`."""
  dt = state_BxHxKxV.dtype
  q, k, v, g = (x.astype(dt) for x in (q_BxHxK, k_BxHxK, v_BxHxV, log_decay))
  if key_mask_B is not None:  # a padded token neither decays nor writes the state
    m = key_mask_B.astype(bool)
    g = jnp.where(m.reshape(m.shape + (1,) * (g.ndim - 1)), g, 0.0)
    k = jnp.where(m[:, None, None], k, 0.0)
  a = jnp.exp(g)
  a_BxHxKx1 = a[..., None, None] if a.ndim == 2 else a[..., None]
  state = a_BxHxKx1 * state_BxHxKxV + k[..., :, None] * v[..., None, :]
  out = jnp.einsum("bhk,bhkv->bhv", q, state)
  return state, out.astype(v_BxHxV.dtype)


def gated_linear_reference(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxV: jax.Array, log_decay: jax.Array,
                           *, segment_ids: jax.Array | None = None, initial_state: jax.Array | None = None):
  """The recurrence scanned token by token (O(L) sequential steps). Returns `(out [B, L, H, V], final state)`."""
  b, length, h, dk = q_BxLxHxK.shape
  dv = v_BxLxHxV.shape[-1]
  dt = state_dtype(q_BxLxHxK, k_BxLxHxK, v_BxLxHxV)
  state = jnp.zeros((b, h, dk, dv), dt) if initial_state is None else initial_state.astype(dt)
  seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids
  prev = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
  new_segment_LxB = jnp.moveaxis(seg != prev, 1, 0)

  def step(state, inputs):
    q, k, v, g, reset = inputs
    state = jnp.where(reset[:, None, None, None], 0.0, state)
    state, out = gated_linear_step(state, q, k, v, g)
    return state, out

  time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
  state, out = jax.lax.scan(step, state, (time_major(q_BxLxHxK), time_major(k_BxLxHxK), time_major(v_BxLxHxV),
                                          time_major(log_decay), new_segment_LxB))
  return jnp.moveaxis(out, 0, 1).astype(v_BxLxHxV.dtype), state


__all__ = ["gated_linear_reference", "gated_linear_step", "state_dtype"]
