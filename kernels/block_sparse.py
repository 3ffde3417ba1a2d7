"""Block-sparse softmax attention: each query block attends only to the key blocks its layout allows.

`layout_HxNxN[h, i, j]` (bool, `H` = heads or 1 shared by all heads, `N = length // block_size`) says whether the
queries of block `i` may attend to the keys of block `j` in head `h`. The softmax runs over the allowed keys only;
`causal=True` also masks keys after the query (inside diagonal blocks too) and `kv_mask` masks keys per batch row
(padding). A query with no allowed key outputs 0 (not NaN), with finite gradients. Implementations:
  "reference"  dense `[B, H, L, L]` scores with the layout expanded to a token mask: the ground truth in tests;
  "xla"        gathers only the allowed key/value blocks of each query block through host-side index tables
               (`[H, N, K]`, K = the most allowed blocks in any row) built from the static layout: memory grows with
               the number of allowed blocks, `O(L * K * block_size)`, not with `L^2`. Plain autodiff gives the
               backward pass (the gather's transpose is a scatter-add), with the same memory scaling;
  "pallas"     the flash-style kernels of `kernels.block_sparse_pallas` (online softmax over the allowed key tiles
               only, custom_vjp backward from the saved log-sum-exp) for the current backend: TPU (Mosaic TPU) or
               GPU (Mosaic GPU, Hopper; bfloat16/float16, tiles and head_dim multiples of 64); no dropout;
  "interpret"  the TPU kernels in Pallas interpret mode (how CPU tests run them).
None picks "pallas" on GPU/TPU when the call fits the kernel (no dropout, tile constraints met) and "xla"
otherwise (CPU included). `block_sizes` (`BlockSizes`) sets the kernel tiles. Scores, softmax and the weighted sum
accumulate in float32 whatever the input dtype; the output has the dtype of `q`. The layout must be concrete
(numpy, or a jax array outside `jit` tracing): it decides the shapes of the gathers and the kernels' index tables.
`block_sparse_attention` jits its work with the layout, block size, causal flag, scale, dropout rate and kernel
options as static arguments, so an eager call compiles once per configuration.
Dropout (`dropout_rate` with a `dropout_rng`) acts on the normalized weights of the allowed keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import block_sparse_pallas
from kernels.block_sparse_pallas import BlockSizes

IMPLEMENTATIONS = ("reference", "xla", "pallas", "interpret", None)
_NEG = float(jnp.finfo(jnp.float32).min)


def _concrete_layout(layout) -> np.ndarray:
  if isinstance(layout, jax.core.Tracer):
    raise ValueError("block_sparse_attention needs a concrete layout (numpy, built on the host); got a traced array "
                     "-- build the layout outside jit or close over it as a constant")
  return np.asarray(layout)


def _check(q, k, v, layout: np.ndarray, block_size: int, kv_mask, implementation) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown block_sparse_attention implementation {implementation!r}; "
                     f"valid choices: {IMPLEMENTATIONS}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, length, heads, head_dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape (self-attention), got {q.shape} and {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must match q in batch, length and heads: {v.shape[:3]} vs {q.shape[:3]}")
  batch, length, heads, _ = q.shape
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive integer, got {block_size=}")
  if length % block_size:
    raise ValueError(f"{length=} must be a multiple of {block_size=}")
  n = length // block_size
  if layout.dtype != np.bool_:
    raise ValueError(f"layout must be a bool array, got dtype {layout.dtype}")
  if layout.ndim != 3 or layout.shape[0] not in (1, heads) or layout.shape[1:] != (n, n):
    raise ValueError(f"layout must have shape [heads or 1, length // block_size, length // block_size] = "
                     f"[{heads} or 1, {n}, {n}], got {layout.shape}")
  if kv_mask is not None and tuple(kv_mask.shape) != (batch, length):
    raise ValueError(f"kv_mask must have shape [batch, length] = {(batch, length)}, got {tuple(kv_mask.shape)}")


def _dropout(weights: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  if rate <= 0.0 or rng is None:
    return weights
  keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
  return jnp.where(keep, weights / (1.0 - rate), 0.0)


def expand_layout(layout_HxNxN: np.ndarray, block_size: int) -> np.ndarray:
  """The token-level mask `[H, L, L]` of a block layout."""
  return np.repeat(np.repeat(np.asarray(layout_HxNxN, bool), block_size, axis=1), block_size, axis=2)


def block_sparse_attention_reference(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                                     layout_HxNxN: np.ndarray, *, block_size: int, causal: bool = False,
                                     scale: float | None = None, kv_mask: jax.Array | None = None,
                                     dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """Dense scores, the layout expanded to a token mask; O(L^2) memory."""
  length = q_BxLxHxD.shape[1]
  scale = q_BxLxHxD.shape[-1] ** -0.5 if scale is None else scale
  scores_BxHxLxL = jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k_BxLxHxD, preferred_element_type=jnp.float32) * scale
  allowed_BxHxLxL = jnp.asarray(expand_layout(layout_HxNxN, block_size))[None]
  if causal:
    allowed_BxHxLxL = allowed_BxHxLxL & jnp.tril(jnp.ones((length, length), bool))
  if kv_mask is not None:
    allowed_BxHxLxL = allowed_BxHxLxL & kv_mask.astype(bool)[:, None, None, :]
  # A finite floor (not -inf) keeps empty rows finite; zeroing their weights afterwards makes them output 0.
  weights = jax.nn.softmax(jnp.where(allowed_BxHxLxL, scores_BxHxLxL, _NEG), axis=-1)
  weights = _dropout(jnp.where(allowed_BxHxLxL, weights, 0.0), dropout_rate, dropout_rng)
  out = jnp.einsum("bhls,bshd->blhd", weights.astype(v_BxLxHxD.dtype), v_BxLxHxD, preferred_element_type=jnp.float32)
  return out.astype(q_BxLxHxD.dtype)


def gather_tables(layout_HxNxN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Host-side index tables: `idx[h, i, :]` lists the key blocks row `i` of head `h` may see, padded to the widest
  row (K columns, at least 1) with block 0; `valid[h, i, k]` marks the real entries."""
  counts_HxN = layout_HxNxN.sum(axis=-1)
  width = max(int(counts_HxN.max(initial=0)), 1)
  # A stable argsort of ~allowed puts the allowed blocks first, in increasing block order.
  order_HxNxN = np.argsort(~layout_HxNxN, axis=-1, kind="stable")
  idx_HxNxK = order_HxNxN[..., :width].astype(np.int32)
  valid_HxNxK = np.arange(width)[None, None, :] < counts_HxN[..., None]
  return np.where(valid_HxNxK, idx_HxNxK, 0).astype(np.int32), valid_HxNxK


def block_sparse_attention_xla(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                               layout_HxNxN: np.ndarray, *, block_size: int, causal: bool = False,
                               scale: float | None = None, kv_mask: jax.Array | None = None,
                               dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """Gathers the allowed key/value blocks per query block; memory O(L * K * block_size)."""
  b, length, h, d = q_BxLxHxD.shape
  c, n = block_size, length // block_size
  scale = d ** -0.5 if scale is None else scale
  idx_HxNxK, valid_HxNxK = gather_tables(layout_HxNxN)
  kw = idx_HxNxK.shape[-1]
  heads_Hx1x1 = np.arange(h)[:, None, None]  # broadcasts a shared [1, N, K] table over the heads

  def blocks(x_BxLxHxD):  # -> [B, H, N, C, D]
    return jnp.transpose(x_BxLxHxD.reshape(b, n, c, h, x_BxLxHxD.shape[-1]), (0, 3, 1, 2, 4))

  q_BxHxNxCxD = blocks(q_BxLxHxD)
  k_BxHxNxKxCxD = blocks(k_BxLxHxD)[:, heads_Hx1x1, idx_HxNxK]
  v_BxHxNxKxCxD = blocks(v_BxLxHxD)[:, heads_Hx1x1, idx_HxNxK]
  scores = jnp.einsum("bhnqd,bhnkcd->bhnqkc", q_BxHxNxCxD, k_BxHxNxKxCxD, preferred_element_type=jnp.float32) * scale

  allowed = jnp.asarray(valid_HxNxK)[None, :, :, None, :, None]  # [1, H, N, 1, K, 1]
  if causal:
    # Token positions from iota (fused by XLA), not a host constant of the size of the scores.
    q_pos_NxC = jnp.arange(length).reshape(n, c)
    k_pos_HxNxKxC = jnp.asarray(idx_HxNxK)[..., None] * c + jnp.arange(c)
    allowed = allowed & (k_pos_HxNxKxC[None, :, :, None, :, :] <= q_pos_NxC[None, None, :, :, None, None])
  if kv_mask is not None:
    mask_BxHxNxKxC = kv_mask.astype(bool).reshape(b, n, c)[:, idx_HxNxK]  # H is 1 for a shared layout
    allowed = allowed & mask_BxHxNxKxC[:, :, :, None, :, :]
  allowed = jnp.broadcast_to(allowed, scores.shape).reshape(b, h, n, c, kw * c)
  scores = scores.reshape(b, h, n, c, kw * c)

  weights = jax.nn.softmax(jnp.where(allowed, scores, _NEG), axis=-1)
  weights = _dropout(jnp.where(allowed, weights, 0.0), dropout_rate, dropout_rng).reshape(b, h, n, c, kw, c)
  out_BxHxNxCxD = jnp.einsum("bhnqkc,bhnkcd->bhnqd", weights.astype(v_BxLxHxD.dtype), v_BxHxNxKxCxD,
                             preferred_element_type=jnp.float32)
  out = jnp.transpose(out_BxHxNxCxD, (0, 2, 3, 1, 4)).reshape(b, length, h, v_BxLxHxD.shape[-1])
  return out.astype(q_BxLxHxD.dtype)


def _resolve(implementation, q, block_size: int, block_sizes, dropout: bool):
  """(implementation, kernel backend or None) for this call; None picks "pallas" where the kernel applies."""
  backend = block_sparse_pallas.accelerator_backend()
  if implementation == "interpret":
    return "interpret", "tpu"
  if implementation == "pallas":
    if backend is None:
      raise ValueError(f"block_sparse_attention implementation='pallas' needs a GPU or TPU backend, got "
                       f"{jax.default_backend()!r}; use implementation='interpret' to run the kernels on CPU")
    if dropout:
      raise ValueError("block_sparse_attention implementation='pallas' has no attention dropout; use 'xla' (or None, "
                       "which falls back to it) when dropout_rate > 0")
    return "pallas", backend
  if implementation is None:
    if backend is None or dropout:
      return "xla", None
    try:
      block_sparse_pallas.check_supported(q.shape, q.dtype, block_size, block_sizes, backend)
    except ValueError:
      return "xla", None
    return "pallas", backend
  return implementation, None


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout, *, block_size: int,
                           causal: bool = False, scale: float | None = None, implementation: str | None = None,
                           kv_mask: jax.Array | None = None, dropout_rate: float = 0.0,
                           dropout_rng: jax.Array | None = None, block_sizes: BlockSizes | None = None) -> jax.Array:
  """Block-sparse softmax attention on `[batch, length, heads, head_dim]` tensors (see the module docstring).

  Args:
    layout: bool `[heads or 1, length // block_size, length // block_size]`, concrete (built on the host).
    scale: score scale (a Python float: it is static); None means `head_dim ** -0.5`.
    kv_mask: optional bool `[batch, length]`, True = a real key that may be attended (padding is False).
    dropout_rate, dropout_rng: dropout on the attention weights (applied only when both are given).
    block_sizes: kernel tiles of the "pallas"/"interpret" implementations (`BlockSizes`); None = backend defaults.
  """
  layout = _concrete_layout(layout)
  _check(q, k, v, layout, block_size, kv_mask, implementation)
  dropout = dropout_rate > 0.0 and dropout_rng is not None
  implementation, backend = _resolve(implementation, q, block_size, block_sizes, dropout)
  return _jitted_attention(q, k, v, _StaticLayout(layout), kv_mask, dropout_rng, block_size=block_size,
                           causal=causal, scale=scale, implementation=implementation, dropout_rate=dropout_rate,
                           block_sizes=block_sizes, backend=backend)


class _StaticLayout:
  """A hashable wrapper so the layout can be a static argument of `jax.jit` (it fixes the gather shapes)."""

  def __init__(self, layout: np.ndarray):
    self.layout = layout
    self._key = (layout.shape, layout.tobytes())

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other) -> bool:
    return isinstance(other, _StaticLayout) and self._key == other._key


# One compiled computation per (layout, options, shapes): eager callers (tests, notebooks) then pay one compilation
# instead of dispatching dozens of small ops; under an outer jit this simply inlines.
@functools.partial(jax.jit, static_argnames=("block_size", "causal", "scale", "implementation", "dropout_rate",
                                             "block_sizes", "backend"), static_argnums=3)
def _jitted_attention(q, k, v, layout: _StaticLayout, kv_mask, dropout_rng, *, block_size, causal, scale,
                      implementation, dropout_rate, block_sizes, backend):
  if implementation in ("pallas", "interpret"):
    return block_sparse_pallas.block_sparse_attention_pallas(
        q, k, v, layout.layout, block_size=block_size, causal=causal, scale=scale, kv_mask=kv_mask,
        block_sizes=block_sizes, backend=backend, interpret=implementation == "interpret")
  fn = block_sparse_attention_reference if implementation == "reference" else block_sparse_attention_xla
  return fn(q, k, v, layout.layout, block_size=block_size, causal=causal, scale=scale, kv_mask=kv_mask,
            dropout_rate=dropout_rate, dropout_rng=dropout_rng)


__all__ = ["BlockSizes", "block_sparse_attention", "block_sparse_attention_reference", "block_sparse_attention_xla",
           "expand_layout", "gather_tables"]
