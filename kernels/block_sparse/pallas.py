"""The backend-neutral driver of the block-sparse Pallas kernels: host tables, padding, the `jax.custom_vjp` joining
a backend's forward and backward kernels, and the routing to that backend's module (`pallas_tpu` or `pallas_gpu`,
which never import each other; both take `[B, H, L, D]` tensors and share `tables.KernelStatic`).

The backward pass recomputes from the forward's per-row log-sum-exp with `delta = rowsum(o * do)` from XLA (the
dropped output, so dropout's rescaling is already inside), as FlashAttention-2 does.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse.tables import KernelStatic, KernelTiles, make_tables
from kernels.platform import Backend

# Backend -> its kernel module, imported on first use so a TPU program never imports Mosaic GPU and vice versa.
BACKEND_MODULES: dict[Backend, str] = {"tpu": "kernels.block_sparse.pallas_tpu",
                                       "gpu": "kernels.block_sparse.pallas_gpu"}


def _backend(st: KernelStatic):
  return importlib.import_module(BACKEND_MODULES[st.backend])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: KernelStatic, q, k, v, key_mask, seed):
  return _backend(st).forward(st, q, k, v, key_mask, seed)[0]


def _attention_fwd(st, q, k, v, key_mask, seed):
  o, lse = _backend(st).forward(st, q, k, v, key_mask, seed)
  return o, (q, k, v, key_mask, seed, o, lse)


def _attention_bwd(st, res, do):
  q, k, v, key_mask, seed, o, lse = res
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, L]
  dq, dk, dv = _backend(st).backward(st, q, k, v, key_mask, seed, do, lse, delta)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention_pallas(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                                  layout_HxNxN: np.ndarray, *, block_size: int, tiles: KernelTiles,
                                  causal: bool = False, scale: float | None = None, key_mask: jax.Array | None = None,
                                  dropout_rate: float = 0.0, dropout_seed: jax.Array | None = None,
                                  backend: Backend = "tpu", interpret=False) -> jax.Array:
  """Block-sparse attention through the Pallas kernels of `backend` ("tpu" or "gpu"), `[B, L, H, D]` in and out.

  `tiles` is the backend's plan for this call (`tables.kernel_tiles`, made once by `kernels.block_sparse_attention`'s
  entry, which also checked the shapes and the layout): nothing is checked again here. `interpret` (True or the
  backend's interpret params) runs the kernels on CPU. `key_mask` (bool `[B, L]`, True = a real key) masks padded
  keys. `dropout_seed` (int32 scalar, `kernels.common.dropout_seed`) with `dropout_rate > 0` drops weights by the
  hash mask shared with the reference.
  """
  layout = np.asarray(layout_HxNxN, bool)
  block_q, block_kv = tiles.block_q, tiles.block_kv
  scale = q_BxLxHxD.shape[-1] ** -0.5 if scale is None else float(scale)
  rate = float(dropout_rate) if dropout_seed is not None else 0.0
  length = q_BxLxHxD.shape[1]
  # Tiles spanning several layout blocks (GPU) may not divide the length: pad with blocks nothing attends to (their
  # rows output 0 and are cut off again; dropout counters of real tokens are unchanged).
  pad = tiles.padded_length - length
  if pad:
    n = tiles.padded_length // block_size
    layout = np.pad(layout, ((0, 0), (0, n - layout.shape[1]), (0, n - layout.shape[2])))
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = widen(q_BxLxHxD), widen(k_BxLxHxD), widen(v_BxLxHxD)
    if key_mask is not None:
      key_mask = jnp.pad(key_mask.astype(bool), ((0, 0), (0, pad)))
  st = KernelStatic(tables=make_tables(layout, block_size, block_q, block_kv, causal),
                    key=(layout.shape, layout.tobytes(), block_size), block_q=block_q, block_kv=block_kv,
                    causal=bool(causal), scale=scale, backend=backend, interpret=interpret, dropout_rate=rate,
                    heads=q_BxLxHxD.shape[2], layout_block=block_size, sub_blocks=tiles.sub_blocks)
  seed = jnp.zeros((1,), jnp.int32) if rate == 0.0 else jnp.reshape(dropout_seed, (1,)).astype(jnp.int32)
  to_bhld = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
  out = _attention(st, to_bhld(q_BxLxHxD), to_bhld(k_BxLxHxD), to_bhld(v_BxLxHxD),
                   None if key_mask is None else key_mask.astype(bool), seed)
  return to_bhld(out)[:, :length]


__all__ = ["BACKEND_MODULES", "block_sparse_attention_pallas"]
