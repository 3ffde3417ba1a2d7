"""Gated linear attention: `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`, `o_t = S_t^T q_t` (causal by construction).

One op for the decay family, as the maths groups it (`log_decay` = g):
  `[B, L, H]`     a decay per head and token: RetNet (fixed gamma_h = 1 - 2^(-5-h), broadcast over tokens),
                  Mamba-2 / SSD (`dt_t * A_h`);
  `[B, L, H, K]`  a decay per key dimension: GLA (`log sigmoid(.) / 16`).
`log_decay` must be finite and <= 0 (a decay in (0, 1]). `key_mask` (bool `[batch, keys]`, True = a real token) drops
a padded token from the state: it neither writes (k = 0) nor decays (g = 0). `segment_ids` (int `[batch, length]`)
packs several sequences in one row: the state restarts from zero where the id changes. `initial_state` (`[B, H, K,
V]`) continues a previous call (sequence-parallel shards); `return_state=True` also returns the final float32 state.
Implementations (the op template of docs/architecture.md "Functional cores"):
  "reference"  `reference.py`: the token-by-token recurrence (a `lax.scan` over tokens): the ground truth in tests;
  "xla"        `xla.py`: chunkwise parallel with cumulative log-decays, states carried across chunks (memory linear
               in length);
  "pallas"     `pallas.py` (custom_vjp: the backward pass is three calls of the forward kernel) over `pallas_tpu.py`
               (Mosaic TPU: a decay per head or per key dimension, chunk a multiple of 8) and `pallas_gpu.py` (Mosaic
               GPU, Hopper: a decay per head, bfloat16/float16, chunk a multiple of 64, key and value dims 64 or 128),
               chosen by the platform the program is lowered for; no segment_ids / initial_state / return_state.
               Never falls back: a call it cannot serve is a ValueError;
  "interpret"  the TPU kernel in Pallas interpret mode (how CPU tests run it; the GPU kernel runs under the GPU
               interpreter through `gated_linear_pallas(..., backend="gpu", interpret=True)`, as the linear-attention
               op's tests run theirs);
  None         the kernel of the platform the program is lowered for (`kernels.platform.dispatch`): the TPU kernel
               on tpu and the GPU kernel on cuda where they serve the call, else the XLA form, the reason logged once.
Precision: float32 inside (states, decays, matmuls), whatever the input dtype; the output has v's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import platform
from kernels.common import check_state_core_inputs
from kernels.gated_linear.pallas import gated_linear_kernel, gated_linear_pallas
from kernels.gated_linear.reference import gated_linear_reference, gated_linear_step
from kernels.gated_linear.tables import check_supported
from kernels.gated_linear.xla import DEFAULT_CHUNK, gated_linear_xla

IMPLEMENTATIONS = ("reference", "xla", "pallas", "interpret", None)
OP = "gated_linear_attention"


def _kernels(q, k, v, log_decay, chunk_size, *, interpret=False, **unsupported) -> dict:
  """Per backend: a thunk running its kernel on this call, or the reason it cannot serve it."""
  out = {}
  for backend in ("tpu", "gpu"):
    try:
      check_supported(q.shape, v.shape, log_decay.shape, jnp.result_type(q, k, v), chunk_size, backend,
                      **unsupported)
    except ValueError as err:
      out[backend] = str(err)
      continue
    out[backend] = (lambda b: lambda: gated_linear_kernel(  # noqa: E731  (bind the backend now; checked above)
        q, k, v, log_decay, chunk=chunk_size, backend=b, interpret=interpret))(backend)
  return out


def _check(q, k, v, log_decay, chunk_size, implementation, key_mask, segment_ids, initial_state):
  check_state_core_inputs(OP, IMPLEMENTATIONS, implementation, q, k, v, chunk_size, key_mask, segment_ids,
                          initial_state)
  if tuple(log_decay.shape) not in (q.shape[:3], q.shape):
    raise ValueError(f"log_decay must be [batch, length, heads] = {q.shape[:3]} (per head) or {q.shape} (per key "
                     f"dimension), got {tuple(log_decay.shape)}")


def mask_tokens(k: jax.Array, log_decay: jax.Array, key_mask: jax.Array | None):
  """A padded token neither writes (k = 0) nor decays (g = 0): it is dropped from the state."""
  if key_mask is None:
    return k, log_decay
  m = key_mask.astype(bool)
  k = jnp.where(m[:, :, None, None], k, jnp.zeros((), k.dtype))
  log_decay = jnp.where(m.reshape(m.shape + (1,) * (log_decay.ndim - 2)), log_decay, jnp.zeros((), log_decay.dtype))
  return k, log_decay


def gated_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, *,
                           chunk_size: int = DEFAULT_CHUNK, key_mask: jax.Array | None = None,
                           segment_ids: jax.Array | None = None, initial_state: jax.Array | None = None,
                           return_state: bool = False, implementation: str | None = None):
  """Gated linear attention of `[batch, length, heads, dim]` q, k, v (see the module docstring). Returns the output
  `[B, L, H, V]` (v's dtype), and with `return_state=True` also the final float32 state `[B, H, K, V]`."""
  _check(q, k, v, log_decay, chunk_size, implementation, key_mask, segment_ids, initial_state)
  k, log_decay = mask_tokens(k, log_decay, key_mask)
  if implementation == "reference":
    out, state = gated_linear_reference(q, k, v, log_decay, segment_ids=segment_ids, initial_state=initial_state)
    return (out, state) if return_state else out
  xla = lambda: gated_linear_xla(q, k, v, log_decay, chunk_size=chunk_size, segment_ids=segment_ids,  # noqa: E731
                                 initial_state=initial_state)
  if implementation == "xla":
    out, state = xla()
    return (out, state) if return_state else out
  if return_state:  # the kernels return no state
    if implementation is not None:  # explicit kernels never fall back
      raise ValueError(f"{OP}: return_state=True is served by implementation='xla' or None, not {implementation!r}")
    reason = "return_state=True is served by the XLA form only"
    return platform.dispatch(OP, xla=xla, kernels={"tpu": reason, "gpu": reason})
  unsupported = dict(segment_ids=segment_ids is not None, initial_state=initial_state is not None, return_state=False)
  if implementation == "interpret":
    check_supported(q.shape, v.shape, log_decay.shape, jnp.result_type(q, k, v), chunk_size, "tpu", **unsupported)
    return gated_linear_kernel(q, k, v, log_decay, chunk=chunk_size, backend="tpu", interpret=True)
  kernels = _kernels(q, k, v, log_decay, chunk_size, **unsupported)
  if implementation == "pallas":
    return platform.require_kernel(OP, kernels=kernels)
  return platform.dispatch(OP, xla=lambda: xla()[0], kernels=kernels)


__all__ = ["IMPLEMENTATIONS", "OP", "gated_linear_attention", "gated_linear_pallas", "gated_linear_reference",
           "gated_linear_step", "gated_linear_xla", "mask_tokens"]
