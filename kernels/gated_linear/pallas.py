"""Pallas driver of gated linear attention with a decay per head (RetNet, Mamba-2; TPU and GPU kernels) or per key
dimension (GLA; TPU kernel): padding, the custom_vjp, routing to the backend module (`pallas_tpu.py`, Mosaic TPU;
`pallas_gpu.py`, Mosaic GPU on Hopper), each given the within-chunk cumulative log-decays in its layout (per head:
lane-broadcast `[B, H, Lp, 128]` on TPU, `[B, H, Lp]` on GPU; per dimension: `[B, H, Lp, K]`).

The backward pass reuses the forward kernel three times. With `w_ij = exp(B_i - B_j)` (j <= i, B the cumulative
log-decay) the output is `o_i = sum_j w_ij (q_i . k_j) v_j`, so
  dq = fwd(q=dO, k=v, v=k; g)                     dq_i = sum_{j<=i} w_ij (dO_i . v_j) k_j
  dk = R fwd(q=R v, k=R dO, v=R q; g')            dk_j = sum_{i>=j} w_ij (dO_i . v_j) q_i
  dv = R fwd(q=R k, k=R q, v=R dO; g')            dv_j = sum_{i>=j} w_ij (q_i . k_j) dO_i
with R the time reversal and `g'_t = g_{L-t}` (`g'_0 = 0`: the reversed pairs' decays, shifted by one), and the
decays' gradient from the identity `dL/dB_t = q_t . dq_t - k_t . dk_t` (w depends on B only through `B_i - B_j`),
`dg_t = sum_{s >= t} dL/dB_s`. With a decay per key dimension the same three calls hold dimension by dimension
(`w_ijd = exp(B_id - B_jd)`): the dQ and dK calls decay their output (the forward's key dim; `decay_on="value"`), the
dV call its scores' contraction as the forward does, and `dL/dB_t = q_t * dq_t - k_t * dk_t` elementwise, reverse-
cumulated per dimension. float32 accumulation throughout; the output has v's dtype.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from kernels.gated_linear.tables import LANES, KernelParams, check_supported, default_chunk
from kernels.platform import Backend

# Backend -> its kernel module, imported on first use so a TPU program never imports Mosaic GPU and vice versa.
BACKEND_MODULES: dict[Backend, str] = {"tpu": "kernels.gated_linear.pallas_tpu",
                                       "gpu": "kernels.gated_linear.pallas_gpu"}


def _cumulative(g: jax.Array, chunk: int, backend: Backend) -> jax.Array:
  """Cumulative log-decay inside each chunk, float32, in the backend's layout: a decay per head `[B, H, Lp]` is
  lane-broadcast on TPU (`[B, H, Lp, 128]`: per-row scalars of a `[C, 128]` block) and as it is on GPU (TMA-copied
  into shared memory); a decay per dimension `[B, H, Lp, D]` as it is."""
  b, h, length = g.shape[:3]
  cum = jnp.cumsum(g.astype(jnp.float32).reshape(b, h, length // chunk, chunk, *g.shape[3:]), axis=3)
  cum = cum.reshape(g.shape)
  if backend == "gpu" or g.ndim == 4:
    return cum
  return jnp.broadcast_to(cum[..., None], (b, h, length, LANES))


def _fwd(st: KernelParams, q, k, v, g, name: str, decay_on: str = "key"):
  """One forward kernel call; a decay per dimension (`g [B, H, Lp, D]`) decays the scores' contraction dimension
  (`decay_on="key"`) or the output's ("value")."""
  module = importlib.import_module(BACKEND_MODULES[st.backend])
  cum = _cumulative(g, st.chunk, st.backend)
  if g.ndim == 4:
    return module.forward_per_dim(st, q, k, v, cum, decay_on=decay_on, name=name)
  return module.forward(st, q, k, v, cum, name=name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated(st: KernelParams, q, k, v, g):
  return _fwd(st, q, k, v, g, "gated_linear_fwd")


def _gated_fwd(st, q, k, v, g):
  return _gated(st, q, k, v, g), (q, k, v, g)


def _gated_bwd(st, res, do):
  q, k, v, g = res
  do = do.astype(v.dtype)
  rev = lambda x: jnp.flip(x, axis=2)  # noqa: E731  [B, H, Lp, *]: time is axis 2
  g_rev = jnp.pad(rev(g)[:, :, :-1], ((0, 0), (0, 0), (1, 0)) + ((0, 0),) * (g.ndim - 3))
  # With a decay per key dimension, dq and dk carry the decay on their output (the forward's key dim): "value".
  dq = _fwd(st, do, v, k, g, "gated_linear_bwd_dq", "value")
  dk = rev(_fwd(st, rev(v), rev(do), rev(q), g_rev, "gated_linear_bwd_dk", "value"))
  dv = rev(_fwd(st, rev(k), rev(q), rev(do), g_rev, "gated_linear_bwd_dv", "key"))
  f32 = jnp.float32
  d_cum = q.astype(f32) * dq.astype(f32) - k.astype(f32) * dk.astype(f32)  # [B, H, Lp, K]: dL/dB per dimension
  if g.ndim == 3:
    d_cum = jnp.sum(d_cum, axis=-1)  # a decay per head: its B_t is shared by every dimension
  dg = jnp.flip(jnp.cumsum(jnp.flip(d_cum, axis=2), axis=2), axis=2)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype)


_gated.defvjp(_gated_fwd, _gated_bwd)


def gated_linear_pallas(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxV: jax.Array, log_decay_BxLxH: jax.Array,
                        *, chunk_size: int | None = None, backend: Backend = "tpu", interpret=False) -> jax.Array:
  """Gated linear attention (`log_decay` per head `[B, L, H]` or per key dimension `[B, L, H, K]`) through the Pallas
  kernel of `backend`; `[B, L, H, *]` in, `[B, L, H, V]` (v's dtype) out. The length is padded to a multiple of the
  chunk with tokens that neither write nor decay. Checks the call first (`tables.check_supported`: a direct caller's
  one check); the op's entry checks once itself and calls `gated_linear_kernel`, which does not check again."""
  chunk = default_chunk(backend) if chunk_size is None else chunk_size
  dtype = jnp.result_type(q_BxLxHxK.dtype, k_BxLxHxK.dtype, v_BxLxHxV.dtype)
  check_supported(q_BxLxHxK.shape, v_BxLxHxV.shape, log_decay_BxLxH.shape, dtype, chunk, backend, segment_ids=False,
                  initial_state=False, return_state=False)
  return gated_linear_kernel(q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, log_decay_BxLxH, chunk=chunk, backend=backend,
                             interpret=interpret)


def gated_linear_kernel(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxV: jax.Array, log_decay_BxLxH: jax.Array,
                        *, chunk: int, backend: Backend, interpret=False) -> jax.Array:
  """`gated_linear_pallas` for a call already checked (the op's plan): the kernel call, no check."""
  dtype = jnp.result_type(q_BxLxHxK.dtype, k_BxLxHxK.dtype, v_BxLxHxV.dtype)
  length = q_BxLxHxK.shape[1]
  pad = -length % chunk

  def prep(x, dt):  # [B, L, H, ...] -> [B, H, Lp, ...]
    x = jnp.swapaxes(x.astype(dt), 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3)) if pad else x

  st = KernelParams(chunk=chunk, backend=backend, interpret=interpret)
  out = _gated(st, prep(q_BxLxHxK, dtype), prep(k_BxLxHxK, dtype), prep(v_BxLxHxV, dtype),
               prep(log_decay_BxLxH, jnp.float32))
  return jnp.swapaxes(out[:, :, :length], 1, 2).astype(v_BxLxHxV.dtype)


__all__ = ["BACKEND_MODULES", "gated_linear_kernel", "gated_linear_pallas"]
