"""Linformer (Wang et al., 2020): keys and values projected along the length axis to `k` rows.

`softmax(Q (E^T K)^T / sqrt(d)) (F^T V)` with learned `E, F: [max_length, k]`, so attention costs `O(L k)`.
Sharing modes (`sharing`), as in the paper's section 4:
- `"none"`: every head has its own `E_i, F_i` (the paper's base formulation, eq. 7);
- `"headwise"`: one `E` and one `F` shared by all heads of the layer;
- `"kv"`: one matrix for keys and values, shared by all heads (`E = F`);
- `"layerwise"`: one matrix shared by keys, values, heads *and layers* (the paper's best). The encoder owns that one
  array (`shared_linformer_projection`, made by `Linformer.shared_layer_inputs`) and hands it to every layer's call
  as `shared_projection=`; a standalone layer, called without it, owns its own `E` (as `"kv"` does).

Inputs shorter than `max_length` use the first rows of `E, F`; padded keys and values are zeroed before the
projection, so the output never depends on padded content. `max_length=0` (the default) takes the length of the
input the layer is initialised on: the encoder initialises on a full-length batch, with its CLS token, so the layer
fits the task without a setting (LRA passes the encoder's `max_len` the same way). Longer inputs are an error.
Linformer cannot be causal: the projections mix all positions.

Defaults follow the paper (`k=256`, per-head projections). The LRA code differs: one matrix for keys and values
shared by all heads (`sharing="kv"`), `k=16` (`low_rank_features`), and padded keys not masked.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import AttentionLayer, default_kernel_init
from attention.registry import register
from attention.ranges import Integer, OneOf
from kernels.softmax import softmax_attention_reference

# sharing mode -> (one matrix per head, keys and values share one matrix)
SHARING: dict[str, tuple[bool, bool]] = {
    "none": (True, False),
    "headwise": (False, False),
    "kv": (False, True),
    "layerwise": (False, True),  # and across layers when the encoder passes `shared_projection`
}
# The encoder-level parameter holding the layerwise projection.
SHARED_PROJECTION = "shared_linformer_projection"


def resolve_max_length(module: nn.Module, max_length: int, length: int, collection: str, name: str, axis: int, *,
                       option: str = "max_length", what: str = "sequence length") -> int:
  """The maximum length a length-dependent variable was built for.

  `max_length > 0` is used as given; `0` means "the input length at init": at init that is `length`, afterwards it is
  read from the stored variable `collection/name` (its `axis`), so later, shorter inputs find the same shape.
  Raises ValueError when `length` exceeds it. `option` and `what` name the setting and the quantity in errors.
  """
  cls = type(module).__name__
  # `max_length >= 0` is the option's range (linformer, synthesizer: max_length; sinkhorn: max_num_blocks), checked by
  # the gate when the layer was built; only the length, which a call alone knows, is checked here.
  resolved = max_length
  if resolved == 0:
    stored = module.has_variable(collection, name)
    resolved = module.get_variable(collection, name).shape[axis] if stored else length
  if length > resolved:
    raise ValueError(f"{cls}: {what} {length} exceeds {option}={resolved}; build the layer with {option} >= {length} "
                     f"(0 = the {what} of the input at init)")
  return resolved


@register("linformer")
class Linformer(AttentionLayer):
  """Attributes: k (projected length), sharing ("none" | "headwise" | "kv" | "layerwise"), max_length (0 = the
  input length at init)."""

  k: int = 256
  sharing: str = "none"
  max_length: int = 0
  option_ranges = {"k": Integer(1), "sharing": OneOf(tuple(SHARING)), "max_length": Integer(0)}

  supports_causal = False
  not_causal_reason = ("the length projections E, F mix every position into each projected key and value, so every "
                       "output depends on every input")

  @classmethod
  def shared_layer_inputs(cls, module: nn.Module, layer_options: Sequence[Mapping[str, Any]],
                          length: int) -> list[dict[str, jax.Array]]:
    """Arrays a model owns once and hands to its layers' calls: with `sharing="layerwise"`, the one projection
    `E = F` (`[max_length, k]`), created as the parameter `shared_linformer_projection` of `module` (the encoder) for
    inputs of `length` positions. One `{call kwarg: array}` per layer; `{}` for layers that do not share."""
    sharing = [o for o in layer_options if o.get("sharing", cls.sharing) == "layerwise"]
    if not sharing:
      return [{} for _ in layer_options]
    shapes = {(o.get("k", cls.k), o.get("max_length", cls.max_length)) for o in sharing}
    if len(shapes) > 1:
      raise ValueError(f"linformer sharing='layerwise' shares one projection, so every layer needs the same k and "
                       f"max_length; got (k, max_length) = {sorted(shapes)}")
    (k, max_length), = shapes  # each in its range: the layers' specs passed the gate
    n = resolve_max_length(module, max_length, length, "params", SHARED_PROJECTION, -2)
    projection = module.param(SHARED_PROJECTION, default_kernel_init, (n, k), jnp.float32)
    return [{"shared_projection": projection} if o.get("sharing", cls.sharing) == "layerwise" else {}
            for o in layer_options]

  def sequence_parallel_form(self) -> str | None:
    # Sequence-sharded keys stay sharded: GSPMD computes the length projection E^T K as per-shard partial sums and
    # one psum over the sequence axis (k rows, independent of the length); every query then sees all k rows.
    return "psum"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True, *,
               shared_projection: jax.Array | None = None) -> jax.Array:
    """`shared_projection`: the model's layerwise `E = F` (`[max_length, k]`); only with `sharing="layerwise"`."""
    self.check_inputs(x, mask)
    per_head, shared_kv = SHARING[self.sharing]
    b, length, _ = x.shape
    q, k, v = self.project_qkv(x)
    if shared_projection is not None:
      if self.sharing != "layerwise":
        raise ValueError(f"Linformer: shared_projection is only for sharing='layerwise', got sharing={self.sharing!r}")
      if shared_projection.ndim != 2 or shared_projection.shape[1] != self.k or shared_projection.shape[0] < length:
        raise ValueError(f"Linformer: shared_projection must have shape [max_length >= {length}, k={self.k}], got "
                         f"{shared_projection.shape}")
      e = f = shared_projection
    else:
      n = resolve_max_length(self, self.max_length, length, "params", "E", -2)
      shape = (self.num_heads, n, self.k) if per_head else (n, self.k)
      # Per-head matrices: the head axis is a batch axis for the fan-in/fan-out of the init.
      init = nn.initializers.xavier_uniform(batch_axis=(0,)) if per_head else default_kernel_init
      e = self.param("E", init, shape, jnp.float32)
      f = e if shared_kv else self.param("F", init, shape, jnp.float32)

    if mask is not None:  # zero padded rows so the projection cannot carry their content
      keep = mask.astype(k.dtype)[:, :, None, None]
      k, v = k * keep, v * keep
    equation = "blhd,hlk->bkhd" if per_head else "blhd,lk->bkhd"
    k_BxKxHxD = jnp.einsum(equation, k, e[..., :length, :].astype(k.dtype))
    v_BxKxHxD = jnp.einsum(equation, v, f[..., :length, :].astype(v.dtype))

    y = softmax_attention_reference(q, k_BxKxHxD, v_BxKxHxD, dropout_rate=self.dropout_rate,
                                    dropout_rng=self.dropout_rng(deterministic))
    return self.project_out(y, x.shape[-1])
