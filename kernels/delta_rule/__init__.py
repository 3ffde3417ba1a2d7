"""The delta rule: `S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `o_t = S_t^T q_t` (causal).

DeltaNet (Schlag et al. 2021; the chunked form of Yang et al., NeurIPS 2024) with `log_decay=None`, Gated DeltaNet
(Yang et al., ICLR 2025) with `log_decay [B, L, H]` (`alpha_t = exp(g_t)`, finite, <= 0). `beta [B, L, H]` in [0, 1]
is the writing strength; the layers L2-normalize k so that `I - beta k k^T` is a contraction. `key_mask` (bool
`[batch, keys]`) drops a padded token from the state (beta = 0, no decay); `segment_ids` (int `[batch, length]`)
restart the state at each boundary (packed sequences); `initial_state` / `return_state` as in
`kernels.gated_linear`. Implementations:
  "reference"  `reference.py`: the token-by-token recurrence: the ground truth in tests;
  "xla"        `xla.py`: chunked through the WY / UT-transform representation (one triangular solve per chunk, the
               chunk transitions scanned);
  "pallas"     `pallas.py` over `pallas_tpu.py` (Mosaic TPU) or `pallas_gpu.py` (Mosaic GPU, Hopper): the chunk
               transforms (UT transform, U, W, the in-chunk matrix) in XLA, the sequential part (the state carried
               across chunks) in the kernel, its backward pass a reverse-chunk kernel (custom_vjp); initial_state
               and return_state are served, segment_ids are not; TPU: chunk a multiple of 8; GPU: chunk 64, key dim
               64 or 128, value dim a multiple of 64, bfloat16/float16 (`tables.check_supported`). Never falls back:
               a call it cannot serve is an error;
  "interpret"  the TPU kernels in Pallas interpret mode (how CPU tests run them);
  None         the kernel of the platform the program is lowered for (`kernels.platform.dispatch`) where it serves
               the call, else the XLA form, the reason logged once.
Precision: float32 inside whatever the input dtype; the output has v's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import platform
from kernels.common import check_state_core_inputs
from kernels.delta_rule.pallas import delta_rule_kernel, delta_rule_pallas
from kernels.delta_rule.reference import delta_rule_reference, delta_rule_step
from kernels.delta_rule.tables import check_supported
from kernels.delta_rule.xla import DEFAULT_CHUNK, delta_rule_xla

IMPLEMENTATIONS = ("reference", "xla", "pallas", "interpret", None)
OP = "delta_rule_attention"


def _kernels(q, k, v, beta, log_decay, chunk_size, *, segment_ids: bool, **state) -> dict:
  """Per backend: a thunk running its kernel on this call, or the reason it cannot serve it."""
  out = {}
  for backend in ("tpu", "gpu"):
    try:
      check_supported(q.shape, v.shape, jnp.result_type(q, k, v), chunk_size, backend, segment_ids=segment_ids)
    except ValueError as err:
      out[backend] = str(err)
      continue
    out[backend] = (lambda b: lambda: delta_rule_kernel(  # noqa: E731  (bind the backend now; checked above)
        q, k, v, beta, log_decay, chunk=chunk_size, backend=b, **state))(backend)
  return out


def _check(q, k, v, beta, log_decay, chunk_size, implementation, key_mask, segment_ids, initial_state):
  check_state_core_inputs(OP, IMPLEMENTATIONS, implementation, q, k, v, chunk_size, key_mask, segment_ids,
                          initial_state)
  for name, x in (("beta", beta), ("log_decay", log_decay)):
    if x is not None and tuple(x.shape) != q.shape[:3]:
      raise ValueError(f"{name} must be [batch, length, heads] = {q.shape[:3]}, got {tuple(x.shape)}")


def mask_tokens(beta: jax.Array, log_decay: jax.Array | None, key_mask: jax.Array | None):
  """A padded token neither writes (beta = 0) nor decays (g = 0)."""
  if key_mask is None:
    return beta, log_decay
  m = key_mask.astype(bool)[:, :, None]
  beta = jnp.where(m, beta, jnp.zeros((), beta.dtype))
  return beta, None if log_decay is None else jnp.where(m, log_decay, jnp.zeros((), log_decay.dtype))


def delta_rule_attention(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                         log_decay: jax.Array | None = None, *, chunk_size: int = DEFAULT_CHUNK,
                         key_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                         initial_state: jax.Array | None = None, return_state: bool = False,
                         implementation: str | None = None):
  """The (gated) delta rule on `[batch, length, heads, dim]` q, k, v (see the module docstring). Returns the output
  `[B, L, H, V]` (v's dtype), and with `return_state=True` also the final float32 state `[B, H, K, V]`."""
  _check(q, k, v, beta, log_decay, chunk_size, implementation, key_mask, segment_ids, initial_state)
  beta, log_decay = mask_tokens(beta, log_decay, key_mask)
  if implementation == "reference":
    out, state = delta_rule_reference(q, k, v, beta, log_decay, segment_ids=segment_ids, initial_state=initial_state)
    return (out, state) if return_state else out
  xla = lambda: delta_rule_xla(q, k, v, beta, log_decay, chunk_size=chunk_size,  # noqa: E731
                               segment_ids=segment_ids, initial_state=initial_state)
  if implementation == "xla":
    out, state = xla()
    return (out, state) if return_state else out
  state = dict(initial_state=initial_state, return_state=return_state)
  if implementation == "interpret":
    check_supported(q.shape, v.shape, jnp.result_type(q, k, v), chunk_size, "tpu", segment_ids=segment_ids is not None)
    return delta_rule_kernel(q, k, v, beta, log_decay, chunk=chunk_size, backend="tpu", interpret=True, **state)
  kernels = _kernels(q, k, v, beta, log_decay, chunk_size, segment_ids=segment_ids is not None, **state)
  if implementation == "pallas":
    return platform.require_kernel(OP, kernels=kernels)
  return platform.dispatch(OP, xla=xla if return_state else lambda: xla()[0], kernels=kernels)


__all__ = ["IMPLEMENTATIONS", "OP", "delta_rule_attention", "delta_rule_pallas", "delta_rule_reference",
           "delta_rule_step", "delta_rule_xla", "mask_tokens"]
