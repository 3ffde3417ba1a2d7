"""The chunked (gated) delta rule in pure JAX through the WY / UT-transform representation (Yang et al., NeurIPS
2024; the gated form of Yang et al., ICLR 2025), memory linear in length.

Write the recurrence as `S_i = a_i S_{i-1} + beta_i k_i e_i^T` with the prediction error `e_i = v_i - a_i S_{i-1}^T
k_i`. Inside a chunk entered with state `S_in`, with `b_i` the cumulative log-decay from the chunk's start and
`R_ij = exp(b_i - b_j)` (j <= i; every exponent <= 0):
  (I + A) E = V - diag(exp(b)) K S_in,     A_ij = R_ij beta_j (k_i . k_j)  for j < i (strictly lower)
so with the UT transform `T = (I + A)^-1` (`unit_lower_inverse`: one unit-lower triangular solve per chunk, its
backward pass matmuls only; shared by both right-hand sides): `U = T V`, `W = T diag(exp(b)) K`, `E = U - W S_in`, and
  O = diag(exp(b)) Q S_in + M E,           M_ij = R_ij beta_j (q_i . k_j)  for j <= i
  S_out = exp(b_C) S_in + (K * beta * exp(b_C - b))^T E.
`T`, `U`, `W` and `M` of every chunk are computed in parallel; only `S_out = (exp(b_C) I - Kd^T W) S_in + Kd^T U` is
scanned. Segments mask the pairs and the state's reach exactly as in `kernels.gated_linear.xla`. float32 inside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.gated_linear.reference import state_dtype
from kernels.gated_linear.xla import chunk_masks, decay_matrix, pad_to_chunks, segment_chunks

DEFAULT_CHUNK = 64


@jax.custom_vjp
def unit_lower_inverse(a_XxCxC: jax.Array) -> jax.Array:
  """`T = (I + A)^-1` for strictly lower-triangular `A` (`[..., C, C]`; the diagonal and upper part are ignored):
  forward substitution, one row per step of a `fori_loop` (row i is `e_i - sum_{j < i} A_ij T_j`, each a batched
  vector-matrix product over the rows already final); the backward pass is matmuls only, `dA = -T^T dT T^T`.
  Not `jax.scipy.linalg.solve_triangular`: the same substitution, but XLA:CPU's batched triangular solve took 130 ms
  for 64 blocks of 64 x 64 (the MQAR runlocal step of deltanet: 2 layers x 32 rows x 2 heads) where this loop takes
  2 ms, with the same float32 error against float64 (its differentiated form also hung asleep at 4K tokens)."""
  c = a_XxCxC.shape[-1]
  eye = jnp.eye(c, dtype=a_XxCxC.dtype)
  columns = jnp.arange(c)

  def row(i, t_XxCxC):
    a_i = jnp.where(columns < i, a_XxCxC[..., i, :], jnp.zeros((), a_XxCxC.dtype))  # strictly lower part of row i
    t_i = eye[i] - jnp.einsum("...j,...jk->...k", a_i, t_XxCxC)  # rows j >= i of t are still e_j, times a_ij = 0
    return t_XxCxC.at[..., i, :].set(t_i)

  return jax.lax.fori_loop(1, c, row, jnp.broadcast_to(eye, a_XxCxC.shape))


def _inverse_fwd(a):
  t = unit_lower_inverse(a)
  return t, t


def _inverse_bwd(t, dt):
  t_t = jnp.swapaxes(t, -1, -2)
  return (-(t_t @ dt @ t_t),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def delta_rule_xla(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxV: jax.Array, beta_BxLxH: jax.Array,
                   log_decay_BxLxH: jax.Array | None = None, *, chunk_size: int = DEFAULT_CHUNK,
                   segment_ids: jax.Array | None = None, initial_state: jax.Array | None = None):
  """Chunked (gated) delta rule (see the module docstring). Returns `(out [B, L, H, V], final state [B, H, K, V])`."""
  b, length, h, dk = q_BxLxHxK.shape
  dv = v_BxLxHxV.shape[-1]
  dt = state_dtype(q_BxLxHxK, k_BxLxHxK, v_BxLxHxV)
  chunk = min(chunk_size, length)
  g = jnp.zeros(beta_BxLxH.shape, dt) if log_decay_BxLxH is None else log_decay_BxLxH
  # [B, N, C, ...]: every chunk's transform is computed at once.
  to_bn = lambda x: pad_to_chunks(x.astype(dt), chunk).reshape(b, -1, chunk, *x.shape[2:])  # noqa: E731
  q, k, v, beta, g = (to_bn(x) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, beta_BxLxH, g))
  n = q.shape[1]
  seg, prev = segment_chunks(segment_ids, b, length, chunk)  # [N, B, C], [N, B]
  flat = lambda x: x.reshape(b * n, *x.shape[2:])  # noqa: E731  [B*N, C, ...]
  seg, prev = flat(jnp.moveaxis(seg, 0, 1)), flat(jnp.moveaxis(prev, 0, 1))
  q, k, v, beta, g = (flat(x) for x in (q, k, v, beta, g))
  pairs, enter, keep, carry = chunk_masks(seg, prev)
  c = chunk
  cum = jnp.cumsum(g, axis=1)  # [BN, C, H]
  total = cum[:, -1]  # [BN, H]
  ratio = decay_matrix(cum, pairs)  # [BN, H, C, C]
  beta_j = jnp.moveaxis(beta, 1, -1)[:, :, None, :]  # [BN, H, 1, C]
  strict = ~jnp.eye(c, dtype=bool)
  a = jnp.einsum("bihk,bjhk->bhij", k, k) * ratio * beta_j * strict
  m = jnp.einsum("bihk,bjhk->bhij", q, k) * ratio * beta_j
  gate_in = jnp.where(enter[:, :, None], jnp.exp(cum), 0.0)  # [BN, C, H]
  rhs = jnp.concatenate([v, k * gate_in[..., None]], axis=-1)  # [BN, C, H, V + K]
  uw = jnp.einsum("bhij,bhjd->bhid", unit_lower_inverse(a), jnp.moveaxis(rhs, 2, 1))
  u, w = uw[..., :dv], uw[..., dv:]  # [BN, H, C, V], [BN, H, C, K]
  k_out = jnp.where(keep[:, :, None], beta * jnp.exp(total[:, None] - cum), 0.0)[..., None] * k  # [BN, C, H, K]
  decay_out = jnp.where(carry[:, None], jnp.exp(total), 0.0)  # [BN, H]
  # S_out = P S_in + Z per chunk, scanned over the chunks of each row.
  p = decay_out[..., None, None] * jnp.eye(dk, dtype=dt) - jnp.einsum("bchk,bhcj->bhkj", k_out, w)
  z = jnp.einsum("bchk,bhcv->bhkv", k_out, u)
  unflat = lambda x: jnp.moveaxis(x.reshape(b, n, *x.shape[1:]), 1, 0)  # noqa: E731  [N, B, ...]

  def step(state_BxHxKxV, pz):
    p, z = pz
    return jnp.einsum("bhkj,bhjv->bhkv", p, state_BxHxKxV) + z, state_BxHxKxV

  state = jnp.zeros((b, h, dk, dv), dt) if initial_state is None else initial_state.astype(dt)
  state, s_in = jax.lax.scan(step, state, (unflat(p), unflat(z)))
  s_in = flat(jnp.moveaxis(s_in, 0, 1))  # [BN, H, K, V]: the state entering each chunk
  e = u - jnp.einsum("bhck,bhkv->bhcv", w, s_in)
  out = jnp.einsum("bchk,bhkv->bchv", q * gate_in[..., None], s_in) + jnp.einsum("bhij,bhjv->bihv", m, e)
  out = out.reshape(b, n * c, h, dv)[:, :length]
  return out.astype(v_BxLxHxV.dtype), state


__all__ = ["DEFAULT_CHUNK", "delta_rule_xla", "unit_lower_inverse"]
