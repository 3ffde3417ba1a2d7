"""Facts every op in `kernels/` shares, written once: the op template, the masked-logit constant and the
attention-dropout rule.

- The op template (`OP_FILES`, `IMPLEMENTATION_VOCABULARY`, `KEY_MASK`): the file roles of every `kernels/<op>/`
  folder, the implementation names every op's `IMPLEMENTATIONS` draws from (same meaning in every op), and the
  one key-padding argument; docs/architecture.md "Functional cores" shows it, tests/kernels/test_template.py checks it.
- `MASK_VALUE`: the finite floor for masked scores (float32 min). Finite, not -inf, so a row whose keys are all masked
  stays finite in values and gradients; online-softmax kernels start their running max from it too (their masked
  scores are -inf, so `exp(s - m)` is exactly 0 and never NaN). Only for float32 scores: cast to bfloat16 it rounds to
  -inf (every site masks float32 scores; a bfloat16 site would need `jnp.finfo(jnp.bfloat16).min` instead).
- The attention-dropout counter hash (`dropout_keep`, `dropout_seed`): a pure function of (seed, batch * heads + head,
  query position, key position), so the reference, the XLA forms and the Pallas kernels (and their backward passes,
  and a sequence-sharded call keyed by global positions) regenerate the same mask from the seed alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = float(np.finfo(np.float32).min)

# ----------------------------------------------------------------------------------------------------------------------
# The op template.

OP_FILES: dict[str, str] = {  # file -> role; "__init__.py" and "reference.py" in every op, the others where they exist
    "__init__.py": "public entry: IMPLEMENTATIONS, OP (the entry's name, used in logs and errors), validation, "
                   "dispatch (kernels.platform)",
    "reference.py": "the dense pure-jnp form: the ground truth in tests",
    "xla.py": "the memory-efficient pure-JAX form (chunked scans, gathers)",
    "tables.py": "host-side tables, kernel tiles, the static call description, each backend's constraints",
    "pallas.py": "the backend-neutral Pallas driver: padding, the custom_vjp, routing to one backend module",
    "pallas_tpu.py": "Mosaic TPU kernels: forward(...) and backward(...) (never imports pallas_gpu)",
    "pallas_gpu.py": "Mosaic GPU kernels: forward(...) and backward(...) (never imports pallas_tpu)",
    "sequence_parallel.py": "the sequence-sharded form (shard_map over a mesh axis), where an op has one",
}
REQUIRED_OP_FILES = ("__init__.py", "reference.py")
# implementation= of every op: "reference" (dense jnp), "xla" (xla.py), "pallas" (the kernels of the platform the
# program is lowered for; never falls back), "interpret" (the TPU kernels in Pallas interpret mode, on CPU), None (the
# best implementation for the platform the program is lowered for). An op lists the ones it has in IMPLEMENTATIONS.
IMPLEMENTATION_VOCABULARY = ("reference", "xla", "pallas", "interpret", None)
KEY_MASK = "key_mask"  # bool [batch, keys], True = a real key that may be attended; every op's entry takes it

# ----------------------------------------------------------------------------------------------------------------------
# Dropout: a counter-based hash of (seed, batch * heads + head, query position, key position), so a backward kernel
# regenerates the forward's mask from the seed alone.

_KEEP_BITS = 24  # the top 24 bits of the hash decide: keep when bits < (1 - rate) * 2^24


def _i32(c: int) -> int:
  """A uint32 constant as the int32 of the same bits (int32 arithmetic wraps like uint32: same bits, and Mosaic
  lowers int32 everywhere)."""
  return c - (1 << 32) if c >= 1 << 31 else c


def _shr(x: jax.Array, bits: int) -> jax.Array:
  # A broadcast numpy constant, not `jnp.full_like`: under the training step's mesh `full_like` of a scalar traces a
  # `reshard` of a literal, which Mosaic GPU cannot lower inside a kernel ("Shaped arrays must be represented by
  # ir.Values").
  return jax.lax.shift_right_logical(x, jax.lax.broadcast(np.int32(bits), np.shape(x)))


def _fmix(x: jax.Array) -> jax.Array:
  x = x ^ _shr(x, 16)
  x = x * _i32(0x85EBCA6B)
  x = x ^ _shr(x, 13)
  x = x * _i32(0xC2B2AE35)
  return x ^ _shr(x, 16)


def keep_threshold(rate: float) -> int:
  """Integer threshold on `_KEEP_BITS` hash bits: a weight is kept when its bits fall below it (P = 1 - rate)."""
  return int(round((1.0 - rate) * (1 << _KEEP_BITS)))


def dropout_keep(seed, batch_head, q_pos, k_pos, rate: float) -> jax.Array:
  """Bool keep-mask (True = keep) for broadcastable int32 counters; `seed` an int32 scalar (`dropout_seed`).

  `batch_head = batch * heads + head`, positions are token indices in the (padded) sequence. Deterministic in its
  arguments only, so any tiling of the scores (XLA gathers, kernel tiles, a backward kernel) regenerates the same
  mask. Plain int32 multiplies, xors and logical shifts (murmur3's finalizer) so it runs in XLA and in the Pallas
  kernels alike.
  """
  i = lambda a: jnp.asarray(a).astype(jnp.int32)  # noqa: E731
  x = _fmix(i(seed) ^ (i(batch_head) * _i32(0x9E3779B1)))
  x = _fmix(x ^ (i(q_pos) * _i32(0x85EBCA77)))
  x = _fmix(x ^ (i(k_pos) * _i32(0xC2B2AE3D)))
  return _shr(x, 32 - _KEEP_BITS) < keep_threshold(rate)


def dropout_seed(rng: jax.Array) -> jax.Array:
  """int32 scalar seed of the dropout hash drawn from a jax PRNG key (typed or raw)."""
  return jax.lax.bitcast_convert_type(jax.random.bits(rng, (), jnp.uint32), jnp.int32)



__all__ = ["IMPLEMENTATION_VOCABULARY", "KEY_MASK", "MASK_VALUE", "OP_FILES", "REQUIRED_OP_FILES", "dropout_keep",
           "dropout_seed", "keep_threshold"]

# ----------------------------------------------------------------------------------------------------------------------
# Compute dtypes: the one vocabulary from config to kernel. `config.model.dtype`, an attention layer's `dtype` and
# the kernels' inputs all mean the same names; "auto" is bfloat16 where the default backend is a GPU or TPU (bfloat16
# matmuls at full rate, and the Pallas kernels take it) and float32 on CPU.

DTYPE_BY_NAME: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
AUTO_DTYPE = "auto"
# Every name a config or a layer accepts, in the order errors list them: the one dtype vocabulary (configs,
# config_checks, the attention layers' `dtype`, the encoder and the kernels all read this tuple).
DTYPE_NAMES: tuple[str, ...] = (*DTYPE_BY_NAME, AUTO_DTYPE)


def resolve_dtype(dtype: Any) -> jnp.dtype:
  """A dtype name of `DTYPE_NAMES` or a floating jnp/numpy dtype -> `jnp.dtype`; ValueError naming the valid names
  otherwise. "auto" is read against `jax.default_backend()` when called."""
  valid = (f"valid choices: {', '.join(DTYPE_NAMES)} (or a floating jnp dtype); set config.model.dtype (or the "
           f"layer's dtype=) to one of them")
  if isinstance(dtype, str):
    if dtype == AUTO_DTYPE:
      return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
    if dtype not in DTYPE_BY_NAME:
      raise ValueError(f"unknown compute dtype {dtype!r}; {valid}")
    return jnp.dtype(DTYPE_BY_NAME[dtype])
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"unknown compute dtype {dtype!r}; {valid}") from None
  if not jnp.issubdtype(resolved, jnp.floating):
    raise ValueError(f"compute dtype must be floating point, got {resolved}; {valid}")
  return resolved


__all__ += ["AUTO_DTYPE", "DTYPE_BY_NAME", "DTYPE_NAMES", "resolve_dtype"]


def check_state_core_inputs(op: str, implementations: tuple, implementation, q, k, v, chunk_size: int, key_mask,
                            segment_ids, initial_state) -> None:
  """The checks every state-carrying chunked core (gated linear attention, the delta rule) makes of a call: the
  implementation, q/k/v `[batch, length, heads, dim]`, the chunk, per-token masks and the carried state's shape."""
  if implementation not in implementations:
    raise ValueError(f"unknown {op} implementation {implementation!r}; valid choices: {implementations}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, length, heads, dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
  if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q and k must have one shape and v their batch, length and heads; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size=}")
  for name, x in (("key_mask", key_mask), ("segment_ids", segment_ids)):
    if x is not None and tuple(x.shape) != q.shape[:2]:
      raise ValueError(f"{name} must have shape [batch, length] = {q.shape[:2]}, got {tuple(x.shape)}")
  want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
  if initial_state is not None and tuple(initial_state.shape) != want:
    raise ValueError(f"initial_state must be [batch, heads, key dim, value dim] = {want}, got "
                     f"{tuple(initial_state.shape)}")
__all__ += ["check_state_core_inputs"]
