"""Softmax attention on `[batch, length, heads, head_dim]` tensors: the public entry and its dispatch.

`softmax_attention(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, *, key_mask=None, causal=False, scale=None, implementation=None,
dropout_rate=0.0, dropout_rng=None, alibi_slopes=None)`, exact softmax attention. `key_mask: bool [batch, keys]`,
True = a real key (the project's key-padding convention); query i sits at position `i + S - L` (queries aligned to the
last keys, as in decoding) for causal masking, the ALiBi bias `-slope_h * |q_pos - k_pos|` and the dropout counters.
k and v may have fewer heads than q (a divisor: grouped-query attention, key/value head `h * Hkv // H` serving query
head h). A query with no allowed key outputs 0 with finite gradients. Implementations (the vocabulary of every op):
  "reference"  the dense einsum form (`reference`): `[B, H, L, S]` scores, the ground truth;
  "xla"        flash attention in pure JAX (`xla`): online softmax over key chunks, a custom_vjp backward that
               recomputes the scores from the saved log-sum-exp, O(L·chunk) memory, causal calls skip the chunks above
               the diagonal; its block primitive `flash_block` (partial outputs + log-sum-exp, global offsets) is what
               ring attention builds on;
  "pallas"     the Pallas flash kernels of the platform the program is lowered for (`pallas`: the flex kernels
               with no mask or the causal one, ALiBi as a score_mod); never falls back (a call they cannot serve
               raises);
  "interpret"  those kernels (the TPU ones) in Pallas interpret mode, how CPU tests run them;
  None         the kernels on cuda/tpu when they can serve the call, chosen at lowering time
               (`kernels.platform.dispatch`), and "xla" otherwise: on CPU, and for decoding (L != S), traced ALiBi
               slopes, or dtypes / head dims the kernel lacks (float32 on GPU), logged once with the reason.
Each call is planned once (`plan`: the checks, the kernels' tiles, block mask and reasons) in the entry; the jitted
body and the kernel driver take the plan and check nothing again.
So flash attention is the default on every platform, with attention dropout on.
cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) is not in the vocabulary: it cannot take the project's
dropout hash (training needs dropout; the same seed must give the same mask in every implementation) nor run on
TPU/CPU, so it stays a candidate to benchmark against, not a dispatch target.

Attention dropout (`dropout_rate` with a `dropout_rng`) drops the normalized weights by the counter hash of
`kernels.common` (seed `dropout_seed(dropout_rng)`, counters (batch * heads + head, query position, key position)) in
every implementation, so all of them give the same values with dropout on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from kernels import platform
from kernels.common import dropout_seed
from kernels.softmax import pallas
from kernels.softmax.reference import alibi_bias, causal_mask, dropout_weights, softmax_attention_reference
from kernels.softmax.xla import DEFAULT_CHUNK, flash_block, softmax_attention_xla

Implementation = Literal["reference", "xla", "pallas", "interpret"] | None
IMPLEMENTATIONS = ("reference", "xla", "pallas", "interpret", None)
OP = "softmax_attention"


def _check(q, k, v, key_mask, alibi_slopes, implementation, dropout_rate: float) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {OP} implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, length, heads, head_dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
  if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
    raise ValueError(f"k must match q in batch and head_dim: k {k.shape} vs q {q.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"key/value heads {k.shape[2]} must divide the query heads {q.shape[2]} (grouped-query "
                     f"attention); got k {k.shape} vs q {q.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must match k in batch, keys and heads: v {v.shape} vs k {k.shape}")
  if key_mask is not None and tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
    raise ValueError(f"key_mask must be bool [batch, keys] = {(k.shape[0], k.shape[1])}, got shape "
                     f"{tuple(key_mask.shape)}")
  if alibi_slopes is not None and tuple(alibi_slopes.shape) != (q.shape[2],):
    raise ValueError(f"alibi_slopes must have shape [heads] = ({q.shape[2]},), got {tuple(alibi_slopes.shape)}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate=}")


@dataclasses.dataclass(frozen=True)
class Plan:
  """One call's plan, made once in the entry (`plan`) and handed, static, to the jitted body and the kernel driver,
  which check nothing again: the options, and the flex kernels' `KernelPlan` (tiles, host block mask, score_mod, and
  per backend the reason its kernels cannot serve the call, or None)."""

  implementation: Implementation
  causal: bool
  scale: float | None
  dropout_rate: float
  kernel: pallas.KernelPlan | None  # None for "reference" / "xla", which run no kernel


def plan(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, *, key_mask=None, causal: bool = False, scale: float | None = None,
         implementation: Implementation = None, dropout_rate: float = 0.0, dropout_rng=None,
         alibi_slopes=None) -> Plan:
  """Checks the call once and plans it; an explicit "interpret" that no kernel serves is refused here."""
  _check(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, key_mask, alibi_slopes, implementation, dropout_rate)
  if dropout_rng is None or dropout_rate == 0.0:
    dropout_rate = 0.0
  kernel = None
  if implementation not in ("reference", "xla"):
    kernel = pallas.plan(q_BxLxHxD.shape, k_BxSxHxD.shape, q_BxLxHxD.dtype, causal=bool(causal),
                         alibi_slopes=alibi_slopes)
    if implementation == "interpret" and (reason := kernel.reason("tpu")) is not None:
      raise ValueError(f"{OP}: implementation='interpret' cannot serve this call: {reason}; use implementation='xla'")
  return Plan(implementation=implementation, causal=bool(causal), scale=None if scale is None else float(scale),
              dropout_rate=float(dropout_rate), kernel=kernel)


def softmax_attention(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array, *,
                      key_mask: jax.Array | None = None, causal: bool = False, scale: float | None = None,
                      implementation: Implementation = None, dropout_rate: float = 0.0,
                      dropout_rng: jax.Array | None = None, alibi_slopes: jax.Array | None = None) -> jax.Array:
  """Exact softmax attention (see the module docstring); the output has the dtype of `q`.

  Args:
    key_mask: optional bool `[batch, keys]`, True = a real key.
    causal: key position <= query position, queries aligned to the last keys.
    scale: score scale (a Python float); None means `head_dim ** -0.5`.
    implementation: "reference", "xla", "pallas", "interpret" or None (best for the lowering platform).
    dropout_rate, dropout_rng: attention dropout (applied only when both are given).
    alibi_slopes: optional float `[heads]`: the ALiBi bias `-slope_h * |q_pos - k_pos|` on the scores (numpy or
      concrete for the kernels, which take it as constants).
  """
  p = plan(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, key_mask=key_mask, causal=causal, scale=scale,
           implementation=implementation, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
           alibi_slopes=alibi_slopes)
  return _jitted(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, key_mask, dropout_rng if p.dropout_rate else None, alibi_slopes,
                 plan=p, staging=platform.staging_key())


def _repeat_kv(x_BxSxKxD: jax.Array, heads: int) -> jax.Array:
  groups = heads // x_BxSxKxD.shape[2]
  return x_BxSxKxD if groups == 1 else jnp.repeat(x_BxSxKxD, groups, axis=2)


# One compiled computation per plan for eager callers; under an outer jit this inlines. `staging` (what dispatch
# stages, kernels/platform.py) is part of the cache key: a trace staged for this CPU alone is never reused by an export.
@functools.partial(jax.jit, static_argnames=("plan", "staging"))
def _jitted(q, k, v, key_mask, dropout_rng, alibi_slopes, *, plan: Plan, staging: str):  # noqa: ARG001
  causal, scale, rate = plan.causal, plan.scale, plan.dropout_rate
  # Grouped-query attention: the dense and XLA forms see K/V repeated to the query heads (their gradients sum back
  # over each group); the flex kernels take the group as it is and load each key/value head once per group.
  heads = q.shape[2]
  if plan.implementation == "reference":
    return softmax_attention_reference(q, _repeat_kv(k, heads), _repeat_kv(v, heads), key_mask=key_mask,
                                       causal=causal, scale=scale, dropout_rate=rate, dropout_rng=dropout_rng,
                                       alibi_slopes=alibi_slopes)

  def xla():
    seed = None if dropout_rng is None else dropout_seed(dropout_rng)
    return softmax_attention_xla(q, _repeat_kv(k, heads), _repeat_kv(v, heads), key_mask=key_mask, causal=causal,
                                 scale=scale, dropout_rate=rate, dropout_seed=seed, alibi_slopes=alibi_slopes)

  def kernel(backend, interpret=False):
    return lambda: pallas.softmax_attention_pallas(q, k, v, plan.kernel, key_mask=key_mask, scale=scale,
                                                   dropout_rate=rate, dropout_rng=dropout_rng, backend=backend,
                                                   interpret=interpret)

  if plan.implementation == "xla":
    return xla()
  if plan.implementation == "interpret":
    return kernel("tpu", True)()
  kernels = {backend: reason or kernel(backend) for backend, reason in plan.kernel.reasons}
  if plan.implementation == "pallas":
    return platform.require_kernel(OP, kernels=kernels)
  return platform.dispatch(OP, xla=xla, kernels=kernels)


__all__ = ["alibi_bias", "causal_mask", "DEFAULT_CHUNK", "dropout_weights", "flash_block", "Implementation",
           "IMPLEMENTATIONS", "Plan", "plan", "softmax_attention", "softmax_attention_reference",
           "softmax_attention_xla"]
