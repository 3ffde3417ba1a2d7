"""Shared pieces of every attention layer: common options, projections, argument checks and decode caches.

Every variant subclasses `AttentionLayer`, so the common options (`num_heads`, `qkv_dim`, `causal`, `dropout_rate`,
`decode`, `dtype`) and the projection submodule names (`query`, `key`, `value`, `out`, as in
`flax.linen.MultiHeadDotProductAttention`) are the same everywhere; one parameter tree can then be applied by
related variants. The machinery variants share lives here once: the compute dtype, the attention-dropout key, the
window/ring decode cache and the per-model default layer schedule (`default_layer_options`). The recurrent-state
cache of the linear-attention family is `attention.recurrent.RecurrentLayer`.

Options are checked by the gate (attention/registry.py: `resolve`, `AttentionSpec.build`, `build`), which reads the
ranges declared here (`COMMON_RANGES`) and in each variant (`option_ranges`) and asks the class the questions a
constant cannot answer (`causal_refusal`). This module imports nothing of the registry (the gate installs its check
for directly constructed layers here: `install_construction_gate`); `check_inputs` checks only what a call knows
(shapes, masks).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, ClassVar, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels.common import DTYPE_NAMES, resolve_dtype
from attention import positions as positions_lib
from attention import ranges as ranges_lib
from kernels import sequence as sequence_lib
from kernels.softmax import dropout_weights

# LRA's initialisation for attention projections.
default_kernel_init = nn.initializers.xavier_uniform()

def _is_compute_dtype(value: Any) -> bool:
  try:
    resolve_dtype(value)
  except (ValueError, TypeError):
    return False
  return True


# The ranges of the common options (the model sets them on every layer: `encoder_owned_options()`), read by the gate
# when a spec is built into a layer.
COMMON_RANGES: Mapping[str, ranges_lib.Range] = {
    "num_heads": ranges_lib.Integer(1),
    "qkv_dim": ranges_lib.Integer(1, allow_none=True),
    "causal": ranges_lib.Boolean(),
    "dropout_rate": ranges_lib.Real(0.0, 1.0, hi_open=True),
    "decode": ranges_lib.Boolean(),
    "dtype": ranges_lib.Satisfies(_is_compute_dtype, f"one of {', '.join(repr(d) for d in DTYPE_NAMES)} or a "
                                                     f"floating jnp dtype"),
    "positions": ranges_lib.OneOf(positions_lib.LAYER_POSITIONS, what="positions"),
}


class AttentionLayer(nn.Module):
  """Base class: `y = layer(x, mask=None, deterministic=True)` with `x: [batch, length, features]`.

  Attributes:
    num_heads: number of heads; must divide `qkv_dim`.
    qkv_dim: total query/key/value width over all heads; None means the input width.
    causal: position t attends only to positions <= t.
    dropout_rate: dropout on attention weights (or the variant's mixing weights).
    decode: autoregressive decoding with a flax `cache` collection (requires `causal=True`).
    dtype: compute dtype of activations and matmuls (`kernels.common.DTYPE_NAMES` or a jnp dtype); parameters
      stay float32, softmax, normalizers and recurrent states accumulate in float32, and the output has this dtype.
    positions: relative positions applied inside the layer (`attention.positions`): "none", "rope" (rotated queries
      and keys) or "alibi" (linear biases on the scores); set by the encoder from `config.model.pos_encoding`.
  """

  num_heads: int = 8
  qkv_dim: int | None = None
  causal: bool = False
  dropout_rate: float = 0.0
  decode: bool = False
  dtype: Any = "float32"
  positions: str = "none"

  # Variants that cannot be causal / cannot decode set these to False and say why.
  supports_causal: ClassVar[bool] = True
  supports_decode: ClassVar[bool] = False
  not_causal_reason: ClassVar[str] = ""
  # True where the decode cache has a fixed size, whatever the sequence length (the recurrent family).
  fixed_size_cache: ClassVar[bool] = False
  # The range of each of the variant's own options (attention/ranges.py), read by `build`, `resolve` and the config
  # checks; subclasses add theirs beside their fields.
  option_ranges: ClassVar[Mapping[str, Any]] = {}
  # The `positions` a variant applies (attention/positions.py); others are refused naming both.
  supported_positions: ClassVar[tuple[str, ...]] = ("none",)

  def __post_init__(self) -> None:
    # A registered variant constructed directly (`LongformerAttention(num_heads=2, ...)`) passes the gate here, once
    # per distinct options; Flax's clones of it and the layers the gate built find their options in the memo.
    check_constructed(self)
    super().__post_init__()

  @classmethod
  def causal_refusal(cls, options: Mapping[str, Any]) -> str | None:
    """Why a layer with these (resolved) options cannot be causal; None when it can. The class constant answers
    for most variants; a variant whose causality depends on its options (Longformer: no global blocks) overrides
    this. Asked by the gate (`AttentionSpec.can_be_causal`), never by the layer."""
    del options
    return None if cls.supports_causal else cls.not_causal_reason

  @classmethod
  def positions_for(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
    """The `positions` a layer with these (resolved) options applies: `supported_positions` unless the answer depends
    on the options (multiplicative attention: RoPE only in its "dot" form). Asked by the gate."""
    del options
    return tuple(cls.supported_positions)

  @classmethod
  def default_layer_options(cls, num_layers: int) -> tuple[dict[str, Any], ...] | None:
    """Per-layer options of the variant's paper architecture (merged over the user's options), or None: the same
    options in every layer. The encoder calls it when `config.model.layer_options` is not set."""
    del num_layers
    return None

  @property
  def compute_dtype(self) -> jnp.dtype:
    return resolve_dtype(self.dtype)  # the one dtype vocabulary: kernels/common.py

  def check_inputs(self, x: jax.Array, mask: jax.Array | None) -> None:
    """What only a call knows: the input and mask shapes, and heads that divide the width when `qkv_dim` is the
    input's. The options were checked by the gate (attention/registry.py) when the layer was built."""
    name = type(self).__name__
    if x.ndim != 3:
      raise ValueError(f"{name} expects x of shape [batch, length, features], got shape {x.shape}")
    if mask is not None and (mask.shape != x.shape[:2]):
      raise ValueError(f"{name}: mask must have shape [batch, length] = {x.shape[:2]}, got {mask.shape}")
    qkv_dim = self.qkv_dim or x.shape[-1]
    if qkv_dim % self.num_heads:
      raise ValueError(f"{name}: qkv_dim={qkv_dim} must be a multiple of num_heads={self.num_heads}")

  def head_dim(self, x: jax.Array) -> int:
    return (self.qkv_dim or x.shape[-1]) // self.num_heads

  def dense(self, features: int | tuple[int, ...], name: str, **kwargs: Any) -> nn.Module:
    """A `DenseGeneral` computing in the layer's dtype with float32 parameters (for the variants' own projections)."""
    return nn.DenseGeneral(features=features, dtype=self.compute_dtype, param_dtype=jnp.float32, name=name, **kwargs)

  def project(self, x: jax.Array, name: str) -> jax.Array:
    """Projects `[B, L, F]` to `[B, L, H, D]` with the shared submodule `name` (query / key / value)."""
    y = self.dense((self.num_heads, self.head_dim(x)), name, axis=-1, kernel_init=default_kernel_init)(x)
    if name in ("key", "value") and self.sequence_parallel_form() is None:
      y = sequence_lib.fallback_gather(y, type(self).__name__)
    return y

  def sequence_parallel_form(self) -> str | None:
    """The form this call takes when its input is sequence-sharded (`kernels.sequence.active()`), e.g. "ring" or
    "state"; None is the exact fallback: keys and values all-gathered along the sequence (logged once)."""
    return None

  def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return self.project(x, "query"), self.project(x, "key"), self.project(x, "value")

  def project_out(self, y_BxLxHxD: jax.Array, features: int) -> jax.Array:
    """Merges heads and projects back to the model width with the shared submodule `out` (in the compute dtype)."""
    return self.dense(features, "out", axis=(-2, -1), kernel_init=default_kernel_init)(
        y_BxLxHxD.astype(self.compute_dtype))

  # ---- attention dropout -----------------------------------------------------------------------------------------

  def dropout_rng(self, deterministic: bool) -> jax.Array | None:
    """The key for attention dropout from the `dropout` stream; None in evaluation or at `dropout_rate=0`.

    Functional cores that take this key (`dropout_rng=`: softmax, block-sparse) drop weights inside the kernel by
    the counter hash of `kernels.common`; a layer that computes its weights itself uses `attention_dropout`.
    """
    if deterministic or self.dropout_rate <= 0.0:
      return None
    return self.make_rng("dropout")

  def attention_dropout(self, weights: jax.Array, deterministic: bool) -> jax.Array:
    """Inverted dropout on attention weights the layer computes itself."""
    return dropout_weights(weights, self.dropout_rate, self.dropout_rng(deterministic))

  # ---- window / ring decode cache --------------------------------------------------------------------------------

  def ring_cache(self, prefix: str, size: int, entries: Mapping[str, jax.Array], mask: jax.Array | None, *,
                 reset_every_cycle: bool = False) -> tuple[dict[str, jax.Array], jax.Array, jax.Array] | None:
    """A decode cache holding the last `size` positions of each of `entries` (`[B, L, ...]` arrays).

    At `init` (no cache yet) it allocates `cache/<prefix>_<entry>` (`[B, size, ...]`), `<prefix>_mask` (`[B, size]`,
    True = a real position is stored) and `<prefix>_index` (positions consumed), and returns None: the caller then
    computes its parallel output. On a decode step (`entries` of length 1) it writes the step into slot
    `index % size` and returns `(buffers, valid_BxS, index)` with `index` the step's position. Slots not yet written
    are invalid, so a `size` of the maximum length is a full cache and a smaller one a sliding window.
    `reset_every_cycle` invalidates every slot when a cycle starts (slot 0): blocks that do not see each other. `size`
    is read at init only.
    """
    first = next(iter(entries.values()))
    batch = first.shape[0]
    initialized = self.has_variable("cache", f"{prefix}_index")
    buffers = {k: self.variable("cache", f"{prefix}_{k}", jnp.zeros, (batch, size, *v.shape[2:]), v.dtype)
               for k, v in entries.items()}
    valid = self.variable("cache", f"{prefix}_mask", jnp.zeros, (batch, size), bool)
    index = self.variable("cache", f"{prefix}_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return None
    if first.shape[1] != 1:
      raise ValueError(f"{type(self).__name__}: a decode step takes one position per call, got length "
                       f"{first.shape[1]}")
    t = index.value
    slot = t % valid.value.shape[1]  # the size allocated at init (a step's own `size` may differ, e.g. its length)
    for k, v in entries.items():
      buffers[k].value = jax.lax.dynamic_update_slice_in_dim(buffers[k].value, v.astype(buffers[k].value.dtype),
                                                             slot, axis=1)
    step_mask = jnp.ones((batch, 1), bool) if mask is None else mask.astype(bool)
    previous = jnp.where(slot == 0, False, valid.value) if reset_every_cycle else valid.value
    valid.value = jax.lax.dynamic_update_slice_in_dim(previous, step_mask, slot, axis=1)
    index.value = t + 1
    return {k: b.value for k, b in buffers.items()}, valid.value, t


def registered_name(cls: type) -> str:
  """The registry name of a variant class (its class name if it is not registered): `attention.register` writes it
  on the class, so this module needs nothing of the registry."""
  return vars(cls).get(REGISTERED_AS) or cls.__name__


REGISTERED_AS = "_registered_as"  # the class attribute `attention.register` sets


# ---- the gate at construction ----------------------------------------------------------------------------------------
# `attention.build` and `AttentionSpec.build` check a layer's options before constructing it; a registered variant
# constructed directly gets the same check from `AttentionLayer.__post_init__`, through the function the gate installs
# (`install_construction_gate`, from attention/builders.py: this module imports nothing of the registry). Memoized per
# (class, options): Flax clones a module at every `init` / `apply` and for every bound copy, and those clones, like the
# layers the gate built itself (`built_by_gate`), are not checked again.

_CONSTRUCTION_GATE: list[Callable[[type, dict[str, Any]], None]] = []
_CHECKED: set = set()
_CHECKED_SIZE = 4096
_BUILT_BY_GATE: contextvars.ContextVar[type | None] = contextvars.ContextVar("built_by_gate", default=None)


def install_construction_gate(gate: Callable[[type, dict[str, Any]], None]) -> None:
  """Sets the check `AttentionLayer.__post_init__` runs on a directly constructed layer: `gate(cls, options)` raises
  the gate's one-line ValueError (attention/builders.py installs `check_constructed_options`)."""
  _CONSTRUCTION_GATE[:] = [gate]


@contextlib.contextmanager
def built_by_gate(cls: type) -> Iterator[None]:
  """Constructing `cls` inside this block: the gate has just checked its options (`AttentionSpec.build`), so
  `__post_init__` records them as checked instead of checking them again."""
  token = _BUILT_BY_GATE.set(cls)
  try:
    yield
  finally:
    _BUILT_BY_GATE.reset(token)


def frozen_key(value: Any) -> Any:
  """A hashable key telling apart values Python calls equal (True, 1 and 1.0 are different options); the gate's memo
  and the construction check's share it."""
  if isinstance(value, Mapping):
    return ("mapping", tuple(sorted((k, frozen_key(v)) for k, v in value.items())))
  if isinstance(value, (list, tuple)):
    return (type(value).__name__, tuple(frozen_key(v) for v in value))
  return (type(value), value)


def constructed_options(layer: nn.Module) -> dict[str, Any]:
  """Every option of a constructed layer (its dataclass fields but Flax's `parent` / `name`)."""
  return {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)
          if f.init and f.name not in ("parent", "name")}


def check_constructed(layer: nn.Module) -> None:
  """The gate for `layer`'s options unless these (class, options) passed it already (module comment above)."""
  if not _CONSTRUCTION_GATE:
    return
  cls, options = type(layer), constructed_options(layer)
  try:
    key = (cls, frozen_key(options))
    hash(key)
  except TypeError:  # an unhashable option value: checked, not memoized
    key = None
  if key is not None and key in _CHECKED:
    return
  if _BUILT_BY_GATE.get() is not cls:
    _CONSTRUCTION_GATE[0](cls, options)
  if key is not None:
    if len(_CHECKED) >= _CHECKED_SIZE:
      _CHECKED.clear()
    _CHECKED.add(key)


def encoder_owned_options() -> tuple[str, ...]:
  """The options the encoder sets on every attention layer (the common `AttentionLayer` fields), not the user."""
  flax_fields = ("parent", "name")
  return tuple(f.name for f in dataclasses.fields(AttentionLayer) if f.init and f.name not in flax_fields)
