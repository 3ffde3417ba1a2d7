"""Linformer (Wang et al., 2020): keys and values projected along the length axis to `k` rows.

`softmax(Q (E^T K)^T / sqrt(d)) (F^T V)` with learned `E, F: [max_length, k]`, so attention costs `O(L k)`.
Sharing modes (`sharing`), as in the paper's section 4:
- `"none"`: every head has its own `E_i, F_i` (the paper's base formulation, eq. 7);
- `"headwise"`: one `E` and one `F` shared by all heads of the layer;
- `"kv"`: one matrix for keys and values, shared by all heads (`E = F`);
- `"layerwise"`: one matrix shared by keys, values, heads *and layers*. A single attention module owns only its
  own parameters, so here it is the same as `"kv"`; sharing across layers needs the encoder to tie the parameters.

Inputs shorter than `max_length` use the first rows of `E, F`; padded keys and values are zeroed before the
projection, so the output never depends on padded content. `max_length=0` (the default) takes the length of the
input the layer is initialised on: the encoder initialises on a full-length batch, with its CLS token, so the layer
fits the task without a setting (LRA passes the encoder's `max_len` the same way). Longer inputs are an error.
Linformer cannot be causal: the projections mix all positions.

Defaults follow the paper (`k=256`, per-head projections). The LRA code differs: one matrix for keys and values
shared by all heads (`sharing="kv"`), `k=16` (`low_rank_features`), and padded keys not masked.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.base import AttentionLayer, default_kernel_init
from attention.registry import register
from attention.softmax import softmax_attention_reference

# sharing mode -> (one matrix per head, keys and values share one matrix)
SHARING: dict[str, tuple[bool, bool]] = {
    "none": (True, False),
    "headwise": (False, False),
    "kv": (False, True),
    "layerwise": (False, True),  # within one layer module; see the module docstring
}


def resolve_max_length(module: nn.Module, max_length: int, length: int, collection: str, name: str, axis: int, *,
                       option: str = "max_length", what: str = "sequence length") -> int:
  """The maximum length a length-dependent variable was built for.

  `max_length > 0` is used as given; `0` means "the input length at init": at init that is `length`, afterwards it is
  read from the stored variable `collection/name` (its `axis`), so later, shorter inputs find the same shape.
  Raises ValueError when `length` exceeds it. `option` and `what` name the setting and the quantity in errors.
  """
  cls = type(module).__name__
  if max_length < 0:
    raise ValueError(f"{cls}: {option} must be >= 0 (0 = the {what} of the input at init), got {max_length}")
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

  supports_causal = False
  not_causal_reason = ("the length projections E, F mix every position into each projected key and value, so every "
                       "output depends on every input")

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    if self.sharing not in SHARING:
      raise ValueError(f"unknown linformer sharing {self.sharing!r}; valid choices: {tuple(SHARING)}")
    if self.k < 1:
      raise ValueError(f"Linformer: k must be >= 1, got {self.k}")
    per_head, shared_kv = SHARING[self.sharing]
    b, length, _ = x.shape
    q, k, v = self.project_qkv(x)
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

    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    y = softmax_attention_reference(q, k_BxKxHxD, v_BxKxHxD, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)
    return self.project_out(y, x.shape[-1])
