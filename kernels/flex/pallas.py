"""The backend-neutral driver of the flex Pallas kernels: padding to whole tiles, the key-validity tiles, the static
call description, the `jax.custom_vjp` joining a backend's forward and backward kernels, and the routing to that
backend's module (`pallas_tpu` or `pallas_gpu`, which never import each other).

The tables are *arguments* (traced int32 arrays: host-built ones become constants, ones built in the step from data or
a top-k selection stay traced); the kernels read them by scalar prefetch. A pure index `mask_mod` is evaluated inside
the kernels on each partial tile; one closing over arrays (document ids, a traced selection) is evaluated here, in
the XLA program, on the partial tiles' index grids (`tables.partial_bitmaps`: O(partial list slots x tile) bfloat16,
never per element of `[L, L]` beyond the lists' bound), and the kernels load the bitmap of the partial tile they
visit instead (TPU: a BlockSpec indexed by the list position; GPU: a TMA copy; the dK/dV pass finds the same bitmap
through `q_partial_pos`, and on GPU reads a transposed copy made by XLA for the backward). The backward recomputes from the forward's
log-sum-exp with `delta = rowsum(o * do)` from XLA (the dropped output, so dropout's rescaling is inside), as
FlashAttention-2 does; dK/dV walk the transposed lists.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from kernels.flex.tables import (BlockMask, FlexStatic, broadcast_batch, check_supported, heads_per_program,
                                 mask_broadcast_dims, partial_bitmaps)
from kernels.platform import Backend

BACKEND_MODULES: dict[Backend, str] = {"tpu": "kernels.flex.pallas_tpu", "gpu": "kernels.flex.pallas_gpu"}


def mask_closes_over_arrays(mask_mod) -> bool:
  """Whether `mask_mod` closes over arrays (host or traced): the kernels then take its partial tiles as bitmaps."""
  if mask_mod is None:
    return False
  i32 = jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.int32)
  return bool(jax.make_jaxpr(mask_mod)(i32, i32, i32, i32).consts)


def _backend(st: FlexStatic):
  return importlib.import_module(BACKEND_MODULES[st.backend])


def _grads(st, res, do, dlse=None):
  q, k, v, kvm, seed, tables, bits, o, lse = res
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  if dlse is not None:  # d lse_i / d s_ij = p_ij, so ds = p * (dp - (delta - dlse)): the kernels take delta - dlse
    delta = delta - dlse.astype(jnp.float32)
  dq, dk, dv = _backend(st).backward(st, q, k, v, kvm, seed, tables, bits, do.astype(o.dtype), lse, delta)
  return dq, dk, dv, None, None, None, None


def _residuals(st, q, k, v, kvm, seed, tables, bits):
  o, lse = _backend(st).forward(st, q, k, v, kvm, seed, tables, bits)
  return (o, lse), (q, k, v, kvm, seed, tables, bits, o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: FlexStatic, q, k, v, kvm, seed, tables, bits):
  return _backend(st).forward(st, q, k, v, kvm, seed, tables, bits)[0]


def _attention_fwd(st, q, k, v, kvm, seed, tables, bits):
  (o, _), res = _residuals(st, q, k, v, kvm, seed, tables, bits)
  return o, res


_attention.defvjp(_attention_fwd, _grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_lse(st: FlexStatic, q, k, v, kvm, seed, tables, bits):
  """`(o, lse)`: the output and its log-sum-exp (MASK_VALUE for a row without keys), differentiable in both."""
  return _backend(st).forward(st, q, k, v, kvm, seed, tables, bits)


_attention_lse.defvjp(_residuals, lambda st, res, cts: _grads(st, res, *cts))


def kernel_tables(bm: BlockMask, mask_mod, batch: int, heads: int) -> tuple[BlockMask, bool]:
  """What flex's kernels read for a call, decided by its plan (`kernels.flex.plan`, the softmax / block-sparse plans,
  the ring's block plans): the tables (repeated over the batch when a mask closing over arrays differs per example on
  batch-shared tables: each example then gets its own bitmaps) and whether the partial tiles come as bitmaps (the
  mask closes over arrays). The plans check `tables.check_supported` on these, so the driver need not."""
  bitmaps = mask_closes_over_arrays(mask_mod)
  if bitmaps and mask_broadcast_dims(mask_mod, batch, heads)[0] > bm.batch:
    bm = broadcast_batch(bm, batch)
  return bm, bitmaps


def flex_attention_pallas(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, bm: BlockMask, *,
                          mask_mod=None, score_mod=None, key_mask=None, scale: float | None = None,
                          dropout_rate: float = 0.0, dropout_seed: jax.Array | None = None,
                          backend: Backend = "tpu", interpret=False, return_lse: bool = False):
  """Flex attention through the Pallas kernels of `backend`; `[B, L, H, D]` in and out, for a direct caller: checks
  the call first (`tables.check_supported`, its one check; not in interpret mode), then runs `flex_attention_kernel`.
  The framework's own paths (flex's, softmax's and block-sparse's entries, the ring) plan the call once and run
  `flex_attention_kernel`, which does not check again."""
  mask_mod = bm.mask_mod if mask_mod is None else mask_mod
  bm, bitmaps = kernel_tables(bm, mask_mod, q_BxLxHxD.shape[0], q_BxLxHxD.shape[2])
  reason = check_supported(q_BxLxHxD.shape, k_BxSxKxD.shape, q_BxLxHxD.dtype, bm, backend, bitmaps)
  if reason is not None and not interpret:
    raise ValueError(f"flex_attention: the {backend} kernels cannot serve this call: {reason}")
  return flex_attention_kernel(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, bm, mask_mod=mask_mod, bitmaps=bitmaps,
                               score_mod=score_mod, key_mask=key_mask, scale=scale, dropout_rate=dropout_rate,
                               dropout_seed=dropout_seed, backend=backend, interpret=interpret, return_lse=return_lse)


def flex_attention_kernel(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, bm: BlockMask, *,
                          mask_mod, bitmaps: bool, score_mod=None, key_mask=None, scale: float | None = None,
                          dropout_rate: float = 0.0, dropout_seed: jax.Array | None = None,
                          backend: Backend = "tpu", interpret=False, return_lse: bool = False):
  """`flex_attention_pallas` for a call its caller planned (`bm`, `bitmaps`: `kernel_tables`; the plan checked
  `tables.check_supported` on them): the kernel call, no check. `score_mod` must be a pure index function (the
  kernels do not return gradients of arrays it closes over: the entry's plan refuses those); `mask_mod` may close
  over arrays, host or traced (`bitmaps`: its partial tiles then come as bitmaps, module docstring).

  `return_lse`: return `(out, lse float32 [B, H, Lq])`, the per-row log-sum-exp of the (modified, masked) scores,
  `MASK_VALUE` for a row without an allowed key (out 0): the convention of `kernels.softmax.xla.flash_block`, so a
  caller merges partial results (the ring's block pairs); gradients flow through both (the lse cotangent enters the
  backward kernels as `delta - dlse`)."""
  b, lq, h, d = q_BxLxHxD.shape
  lk, hkv = k_BxSxKxD.shape[1:3]
  bq, bkv = bm.q_block, bm.kv_block
  tq, tk = bm.num_q_tiles, bm.num_kv_tiles
  gp = heads_per_program(h, hkv, bm.heads)
  rate = float(dropout_rate) if dropout_seed is not None and dropout_rate > 0.0 else 0.0
  kvm = None
  if key_mask is not None or tk * bkv != lk:
    km = jnp.ones((b, lk), bool) if key_mask is None else jnp.asarray(key_mask, bool)
    kvm = jnp.pad(km, ((0, 0), (0, tk * bkv - lk))).astype(jnp.int32).reshape(b * tk, 1, bkv)
  st = FlexStatic(q_block=bq, kv_block=bkv, q_tiles=tq, kv_tiles=tk, heads=h, kv_heads=hkv, group_per_program=gp,
                  table_batch=bm.batch, table_heads=bm.heads, scale=float(d ** -0.5 if scale is None else scale),
                  rate=rate, has_key_tiles=kvm is not None, mask_mod=None if bitmaps else mask_mod,
                  score_mod=score_mod, mods_key=(None if bitmaps else id(mask_mod), id(score_mod)), backend=backend,
                  interpret=interpret, has_bitmaps=bitmaps)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
  # [B, L, H, D] -> [B, H // gp, gp, L, D]: the gp query heads of a program are one block.
  q = jnp.transpose(pad(q_BxLxHxD, tq * bq), (0, 2, 1, 3)).reshape(b, h // gp, gp, tq * bq, d)
  k = jnp.transpose(pad(k_BxSxKxD, tk * bkv), (0, 2, 1, 3))
  v = jnp.transpose(pad(v_BxSxKxD, tk * bkv), (0, 2, 1, 3))
  seed = jnp.zeros((1,), jnp.int32) if not rate else jnp.reshape(dropout_seed, (1,)).astype(jnp.int32)
  tables = tuple(jnp.asarray(x, jnp.int32).reshape(-1) for x in (
      bm.kv_num_full, bm.kv_full_idx, bm.kv_num_partial, bm.kv_partial_idx,
      bm.q_num_full, bm.q_full_idx, bm.q_num_partial, bm.q_partial_idx))
  bits = None
  if bitmaps:
    bits, pos = partial_bitmaps(bm, mask_mod, h)
    tables = tables + (pos.reshape(-1),)
  widths = (bm.kv_full_idx.shape[-1], bm.kv_partial_idx.shape[-1], bm.q_full_idx.shape[-1],
            bm.q_partial_idx.shape[-1])
  st = dataclasses.replace(st, mods_key=st.mods_key + (widths,))
  if return_lse:
    out, lse = _attention_lse(st, q, k, v, kvm, seed, tables, bits)  # lse [B, H // gp, gp, Lq_pad]
  else:
    out, lse = _attention(st, q, k, v, kvm, seed, tables, bits), None  # [B, H // gp, gp, Lq_pad, D]
  out = jnp.transpose(out.reshape(b, h, tq * bq, -1)[:, :, :lq], (0, 2, 1, 3))
  return out if lse is None else (out, lse.reshape(b, h, tq * bq)[:, :, :lq])


__all__ = ["BACKEND_MODULES", "flex_attention_kernel", "flex_attention_pallas", "kernel_tables",
           "mask_closes_over_arrays"]
