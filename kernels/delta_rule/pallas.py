"""Pallas driver of the (gated) delta rule: padding, the chunk transforms in XLA, the custom_vjp of the sequential
part, routing to the backend module (`pallas_tpu.py`: Mosaic TPU; `pallas_gpu.py`: Mosaic GPU, Hopper;
`tables.check_supported` says what each cannot serve).

The split (the maths of `kernels.delta_rule.xla`): everything without a sequential dependency is computed per chunk in
XLA, in float32: the cumulative log-decays `b`, `R_ij = exp(b_i - b_j)` (j <= i, exponents <= 0), the UT transform
`T = (I + A)^-1` (`A_ij = R_ij beta_j k_i.k_j`, j < i), `U = T V`, `W = T diag(exp b) K`, `M_ij = R_ij beta_j q_i.k_j`
(j <= i), `Qg = diag(exp b) Q`, `Kd = K * beta * exp(b_C - b)` and the chunk's decay `dc = exp(b_C)`. The kernel
carries the float32 state across chunks, from `initial_state` (zeros by default) to the final state (returned on
request): `E = U - W S`, `O = Qg S + M E`, `S <- dc S + Kd^T E`. The custom_vjp wraps only that kernel; its backward
pass is the reverse-chunk kernel (`backward`), and the transforms get their gradients by autodiff (the UT inverse
through `unit_lower_inverse`'s matmul-only rule). Residuals: the inputs of the kernel and the state entering each
chunk, `[B, H, L/C, K, V]` (as fla saves them): memory linear in length. A padded token (the tail up to a multiple of
the chunk) has beta = 0 and no decay: it neither writes nor decays (nor changes the final state).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from kernels.delta_rule.tables import DEFAULT_CHUNKS, SUBLANES, KernelParams, check_supported
from kernels.delta_rule.xla import unit_lower_inverse
from kernels.platform import Backend

BACKEND_MODULES: dict[Backend, str] = {"tpu": "kernels.delta_rule.pallas_tpu", "gpu": "kernels.delta_rule.pallas_gpu"}


def _module(st: KernelParams):
  return importlib.import_module(BACKEND_MODULES[st.backend])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recurrence(st: KernelParams, qg, m, u, w, kd, dc, s0):
  """(o `[B, H, Lp, V]`, final state `[B, H, K, V]` float32) of the kernel entered with the state `s0`."""
  out, _, final = _module(st).forward(st, qg, m, u, w, kd, dc, s0, save_states=False)
  return out, final


def _recurrence_fwd(st, qg, m, u, w, kd, dc, s0):
  out, states, final = _module(st).forward(st, qg, m, u, w, kd, dc, s0, save_states=True)
  return (out, final), (qg, m, u, w, kd, dc, s0, states)


def _recurrence_bwd(st, res, cotangents):
  qg, m, u, w, kd, dc, s0, states = res
  do, dfinal = cotangents
  grads = _module(st).backward(st, qg, m, u, w, kd, dc, states, do, dfinal)
  return tuple(g.astype(x.dtype) for g, x in zip(grads, (qg, m, u, w, kd, dc, s0)))


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _chunk_transforms(q, k, v, beta, g, chunk: int):
  """`[B, H, N, C, *]` float32 inputs -> the kernel's inputs `Qg, M, U, W, Kd` `[B, H, N, C, *]`, `dc` `[B, H, N]`."""
  cum = jnp.cumsum(g, axis=-1)  # [B, H, N, C], <= 0 and decreasing
  total = cum[..., -1]
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  diff = cum[..., :, None] - cum[..., None, :]
  ratio = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0) * beta[..., None, :]  # R_ij beta_j
  strict = ~jnp.eye(chunk, dtype=bool)
  a = jnp.einsum("bhnik,bhnjk->bhnij", k, k) * ratio * strict
  m = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * ratio
  t = unit_lower_inverse(a)
  gate = jnp.exp(cum)[..., None]
  u = t @ v
  w = t @ (k * gate)
  kd = k * (beta * jnp.exp(total[..., None] - cum))[..., None]
  return q * gate, m, u, w, kd, jnp.exp(total)


def delta_rule_pallas(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxV: jax.Array, beta_BxLxH: jax.Array,
                      log_decay_BxLxH: jax.Array | None = None, *, chunk_size: int | None = None,
                      initial_state: jax.Array | None = None, return_state: bool = False, backend: Backend = "tpu",
                      interpret=False):
  """The (gated) delta rule through the Pallas kernels of `backend`; `[B, L, H, *]` in, `[B, L, H, V]` (v's dtype)
  out, entered with `initial_state` `[B, H, K, V]` (default zeros), and with `return_state=True` also the final
  float32 state. The length is padded to a multiple of the chunk with tokens that neither write nor decay. Checks
  the call first (`tables.check_supported`: a direct caller's one check); the op's entry checks once itself and calls
  `delta_rule_kernel`, which does not check again."""
  chunk = DEFAULT_CHUNKS[backend] if chunk_size is None else chunk_size
  dtype = jnp.result_type(q_BxLxHxK.dtype, k_BxLxHxK.dtype, v_BxLxHxV.dtype)
  check_supported(q_BxLxHxK.shape, v_BxLxHxV.shape, dtype, chunk, backend, segment_ids=False)
  return delta_rule_kernel(q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, beta_BxLxH, log_decay_BxLxH, chunk=chunk,
                           initial_state=initial_state, return_state=return_state, backend=backend,
                           interpret=interpret)


def delta_rule_kernel(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxV: jax.Array, beta_BxLxH: jax.Array,
                      log_decay_BxLxH: jax.Array | None = None, *, chunk: int, initial_state: jax.Array | None = None,
                      return_state: bool = False, backend: Backend = "tpu", interpret=False):
  """`delta_rule_pallas` for a call already checked (the op's plan): the kernel call, no check."""
  dtype = jnp.result_type(q_BxLxHxK.dtype, k_BxLxHxK.dtype, v_BxLxHxV.dtype)
  b, length, h, dk = q_BxLxHxK.shape
  dv = v_BxLxHxV.shape[-1]
  if backend == "tpu":  # a short sequence is one chunk, not a padded long one (the GPU kernels' chunk is fixed)
    chunk = min(chunk, -(-length // SUBLANES) * SUBLANES)
  if log_decay_BxLxH is None:  # DeltaNet: no decay
    log_decay_BxLxH = jnp.zeros(beta_BxLxH.shape, jnp.float32)
  pad = -length % chunk
  n = (length + pad) // chunk

  def prep(x):  # [B, L, H, ...] -> [B, H, N, C, ...] float32, zero-padded
    x = jnp.moveaxis(x.astype(jnp.float32), 1, 2)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3)) if pad else x
    return x.reshape(b, h, n, chunk, *x.shape[3:])

  qg, m, u, w, kd, dc = _chunk_transforms(*(prep(x) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, beta_BxLxH,
                                                              log_decay_BxLxH)), chunk)
  tokens = lambda x: x.reshape(b, h, n * chunk, x.shape[-1]).astype(dtype)  # noqa: E731  [B, H, Lp, *]
  st = KernelParams(chunk=chunk, backend=backend, interpret=interpret)
  s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
  out, final = _recurrence(st, *(tokens(x) for x in (qg, m, u, w, kd)), dc, s0)
  out = jnp.swapaxes(out[:, :, :length], 1, 2).astype(v_BxLxHxV.dtype)
  return (out, final) if return_state else out


__all__ = ["delta_rule_kernel", "delta_rule_pallas"]
