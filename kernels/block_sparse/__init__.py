"""Block-sparse softmax attention: each query block attends only to the key blocks its layout allows.

`layout_HxNxN[h, i, j]` (bool, `H` = heads or 1 shared by all heads, `N = length // block_size`) says whether the
queries of block `i` may attend to the keys of block `j` in head `h`. The softmax runs over the allowed keys only;
`causal=True` also masks keys after the query (inside diagonal blocks too) and `key_mask` (bool `[batch, keys]`,
True = a real key) masks padded keys. A query with no allowed key outputs 0 (not NaN), with finite gradients.
Implementations (the op template of docs/architecture.md "Functional cores"):
  "reference"  dense `[B, H, L, L]` scores with the layout expanded to a token mask (`reference`): the ground truth;
  "xla"        `xla`: dense query rows (global tokens) over all keys, a shared slab for global key columns, and the
               remaining allowed blocks of the other rows gathered through host-side index tables (`tables`) padded
               to the widest *sparse* row: O(L·K·C + G·C·L) time and memory for K blocks per sparse row and G global
               blocks (C = block_size), never L times the widest row. A custom_vjp recomputes the scores from the saved
               log-sum-exp in the backward pass (online softmax over the gathered blocks, flash-style);
  "pallas"     flex's flash-style kernels (`kernels.flex.pallas`, one kernel family: the layout is a flex block mask,
               `tables.kernel_plan`; TPU, and Mosaic GPU on Hopper: bfloat16/float16, head_dim 64 or 128, 64-token
               tiles whose partial tiles mask the layout's blocks inside them when `block_size` is 16 or 32) of the
               platform the program is lowered for; never falls back (a call the kernel cannot serve raises a
               ValueError naming the constraint);
  "interpret"  the TPU kernels in Pallas interpret mode (how CPU tests run them).
None picks, at lowering time (`kernels.platform.dispatch`), the kernel on cuda/tpu when it can serve the call and
"xla" otherwise (CPU, or a call outside the kernel's tiles/dtypes: logged once with the reason), so a step exported
or AOT-compiled for an accelerator from a CPU host holds the kernels. `block_sizes` (`BlockSizes`) sets the kernel
tiles (flex's tiles over the layout). Scores, softmax and the weighted sum accumulate in float32 whatever the input dtype; the output has the dtype
of `q`. The layout must be concrete (numpy, or a jax array outside `jit` tracing): it decides the shapes of the
gathers and the kernels' index tables. Each call is planned once in the entry (`plan`: the checks, and per backend
its `KernelPlan`, the layout's flex block mask at its tiles, or the reason the kernels cannot serve the call);
`block_sparse_attention` jits its work with the plan static (an eager call compiles once per configuration), and the
kernel driver follows the plan without checking it again.

Dropout (`dropout_rate` with a `dropout_rng`) acts on the normalized weights of the allowed keys with one mask in
every implementation: a counter-based hash of (seed, batch·heads + head, query position, key position)
(`kernels.common.dropout_keep`, the seed drawn from `dropout_rng`), which the backward kernels regenerate; so all
implementations give the same values with dropout on.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from kernels import platform
from kernels.block_sparse import tables
from kernels.block_sparse.reference import block_sparse_attention_reference
from kernels.block_sparse.tables import BlockSizes, KernelPlan, expand_layout, gather_tables, xla_plan
from kernels.block_sparse.pallas import block_sparse_attention_kernels
from kernels.block_sparse.xla import block_sparse_attention_xla
from kernels.common import dropout_keep, dropout_seed

IMPLEMENTATIONS = ("reference", "xla", "pallas", "interpret", None)
OP = "block_sparse_attention"


def _concrete_layout(layout) -> np.ndarray:
  if isinstance(layout, jax.core.Tracer):
    raise ValueError("block_sparse_attention needs a concrete layout (numpy, built on the host); got a traced array "
                     "-- build the layout outside jit or close over it as a constant")
  return np.asarray(layout)


def _check(q, k, v, layout: np.ndarray, block_size: int, key_mask, implementation, dropout_rate: float) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {OP} implementation {implementation!r}; valid choices: {IMPLEMENTATIONS}")
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
  if key_mask is not None and tuple(key_mask.shape) != (batch, length):
    raise ValueError(f"key_mask must have shape [batch, length] = {(batch, length)}, got {tuple(key_mask.shape)}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate=}")


class _StaticLayout:
  """A hashable wrapper so the layout can be part of a static argument of `jax.jit` (it fixes the gather shapes)."""

  def __init__(self, layout: np.ndarray):
    self.layout = layout
    self._key = (layout.shape, layout.tobytes())

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other) -> bool:
    return isinstance(other, _StaticLayout) and self._key == other._key


@dataclasses.dataclass(frozen=True)
class Plan:
  """One call's plan, made once by the entry (`plan`) and handed, static, to the jitted body and the kernel driver,
  which check nothing again: the options, and per backend its `KernelPlan` or the reason its kernels cannot serve
  the call (none for "reference" / "xla"; only "tpu" for "interpret")."""

  implementation: str | None
  layout: _StaticLayout
  block_size: int
  causal: bool
  scale: float | None
  dropout_rate: float
  kernels: tuple[tuple[str, KernelPlan | str], ...] = ()


def plan(q: jax.Array, k: jax.Array, v: jax.Array, layout, *, block_size: int, causal: bool = False,
         scale: float | None = None, implementation: str | None = None, key_mask: jax.Array | None = None,
         dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
         block_sizes: BlockSizes | None = None) -> Plan:
  """Checks the call once and plans it (each backend's tiles once); an explicit "interpret" that the TPU kernels
  cannot serve is refused here, naming their constraint."""
  layout = _concrete_layout(layout)
  _check(q, k, v, layout, block_size, key_mask, implementation, dropout_rate)
  if dropout_rng is None or dropout_rate == 0.0:
    dropout_rate = 0.0
  kernels = ()
  if implementation not in ("reference", "xla"):
    backends = ("tpu",) if implementation == "interpret" else ("tpu", "gpu")
    kernels = tuple((b, tables.kernel_plan(q.shape, q.dtype, layout, block_size, block_sizes, causal, b))
                    for b in backends)
    if implementation == "interpret" and isinstance(kernels[0][1], str):
      raise ValueError(f"{OP}: implementation='interpret' cannot serve this call: {kernels[0][1]}")
  return Plan(implementation=implementation, layout=_StaticLayout(layout), block_size=int(block_size),
              causal=bool(causal), scale=None if scale is None else float(scale), dropout_rate=float(dropout_rate),
              kernels=kernels)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout, *, block_size: int,
                           causal: bool = False, scale: float | None = None, implementation: str | None = None,
                           key_mask: jax.Array | None = None, dropout_rate: float = 0.0,
                           dropout_rng: jax.Array | None = None, block_sizes: BlockSizes | None = None) -> jax.Array:
  """Block-sparse softmax attention on `[batch, length, heads, head_dim]` tensors (see the module docstring).

  Args:
    layout: bool `[heads or 1, length // block_size, length // block_size]`, concrete (built on the host).
    scale: score scale (a Python float: it is static); None means `head_dim ** -0.5`.
    implementation: "reference", "xla", "pallas", "interpret" or None (best for the lowering platform).
    key_mask: optional bool `[batch, length]`, True = a real key that may be attended (padding is False).
    dropout_rate, dropout_rng: dropout on the attention weights (applied only when both are given).
    block_sizes: kernel tiles of the "pallas"/"interpret" implementations (`BlockSizes`); None = backend defaults.
  """
  p = plan(q, k, v, layout, block_size=block_size, causal=causal, scale=scale, implementation=implementation,
           key_mask=key_mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng, block_sizes=block_sizes)
  return _jitted_attention(q, k, v, key_mask, dropout_rng if p.dropout_rate else None, plan=p,
                           staging=platform.staging_key())


# One compiled computation per plan (layout, options, shapes): eager callers (tests, notebooks) then pay one
# compilation instead of dispatching dozens of small ops; under an outer jit this simply inlines. `staging` (what
# dispatch stages, kernels/platform.py) is part of the cache key: a CPU-only trace is never reused by an export.
@functools.partial(jax.jit, static_argnames=("plan", "staging"))
def _jitted_attention(q, k, v, key_mask, dropout_rng, *, plan: Plan, staging: str):  # noqa: ARG001
  seed = None if dropout_rng is None else dropout_seed(dropout_rng)
  layout = plan.layout.layout
  common = dict(block_size=plan.block_size, causal=plan.causal, scale=plan.scale, key_mask=key_mask,
                dropout_rate=plan.dropout_rate, dropout_seed=seed)

  def xla():
    if plan.implementation == "reference":
      return block_sparse_attention_reference(q, k, v, layout, **common)
    return block_sparse_attention_xla(q, k, v, layout, **common)

  def kernel(backend, kernel_plan, interpret=False):
    return lambda: block_sparse_attention_kernels(q, k, v, kernel_plan, scale=plan.scale, key_mask=key_mask,
                                                  dropout_rate=plan.dropout_rate, dropout_seed=seed, backend=backend,
                                                  interpret=interpret)

  if plan.implementation in ("reference", "xla"):
    return xla()
  if plan.implementation == "interpret":
    return kernel("tpu", plan.kernels[0][1], True)()
  kernels = {backend: kp if isinstance(kp, str) else kernel(backend, kp) for backend, kp in plan.kernels}
  if plan.implementation == "pallas":
    return platform.require_kernel(OP, kernels=kernels)
  return platform.dispatch(OP, xla=xla, kernels=kernels)


__all__ = ["block_sparse_attention", "block_sparse_attention_kernels", "block_sparse_attention_reference", "block_sparse_attention_xla", "BlockSizes",
           "dropout_keep", "dropout_seed", "expand_layout", "gather_tables", "IMPLEMENTATIONS", "KernelPlan", "Plan",
           "plan", "xla_plan"]
