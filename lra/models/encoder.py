"""The one generic encoder: embeddings, positional encoding, pre-LN blocks with attention as the plug, pooling.

Attention is built from the per-layer `attention.AttentionSpec`s the gate resolved once (`attention.resolve`, called
by `encoder_from_config`), so every variant runs in the same encoder and its parameters sit under the same path
(`block_<i>/attention/...`); the blocks build their layers from the specs without checking the options again.
Mixed precision: `dtype` is the compute dtype of activations and matmuls (embeddings,
attention, MLP, heads); parameters stay float32, LayerNorm statistics, softmax, normalizers and recurrent states are
computed in float32, and heads return float32 logits.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import attention as attention_lib
from kernels import sequence as sequence_lib
from lra.models import embeddings, patches
from lra.models.embeddings import PositionalEncoding
from lra.models.mlp import MlpBlock
from kernels.common import resolve_dtype
from lra.models.reversible import ReversibleBlocks

POOLINGS = ("cls", "mean", "none")


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  """LayerNorm with float32 parameters; Flax computes its statistics in float32 (at least) and returns `dtype`."""
  return nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, name=name)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)); post-LN (`post_ln=True`, the original Transformer and the
  Grassmann paper): LN(x + Attn(x)), then LN(x + MLP(x))."""

  attention: attention_lib.AttentionSpec
  num_heads: int
  qkv_dim: int
  mlp_dim: int
  dropout_rate: float
  attention_dropout_rate: float
  causal: bool = False
  decode: bool = False
  post_ln: bool = False
  dtype: Any = jnp.float32  # compute dtype
  positions: str = "none"  # relative positions inside attention (`AttentionLayer.positions`: "rope", "alibi")

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool,
               shared: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """`shared`: arrays the encoder owns for all layers (e.g. Linformer's layerwise projection), passed to the
    attention call as keyword arguments."""
    layer = self.attention.build(num_heads=self.num_heads, qkv_dim=self.qkv_dim, causal=self.causal,
                                 dropout_rate=self.attention_dropout_rate, decode=self.decode, dtype=self.dtype,
                                 positions=self.positions, name="attention")
    mlp = MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype, name="mlp")
    ln_attention, ln_mlp = layer_norm("ln_attention", self.dtype), layer_norm("ln_mlp", self.dtype)
    dropout = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
    shared = dict(shared or {})
    attend = lambda h: attend_logging_form(  # noqa: E731
        "/".join(self.path), layer, h, mask=mask, deterministic=deterministic, **shared)
    if self.post_ln:
      x = ln_attention(x + dropout(attend(x)))
      return ln_mlp(x + dropout(mlp(x, deterministic)))
    x = x + dropout(attend(ln_attention(x)))
    return x + dropout(mlp(ln_mlp(x), deterministic))


def attend_logging_form(where: str, layer: nn.Module, x: jax.Array, **kwargs: Any) -> jax.Array:
  """`layer(x, **kwargs)`; sequence-sharded, it logs the one form that ran (`log_sequence_form`)."""
  if sequence_lib.active() is None:
    return layer(x, **kwargs)
  with sequence_lib.recording() as records:
    y = layer(x, **kwargs)
  log_sequence_form(where or "block", layer, records)
  return y


_announced: set[tuple[str, tuple[str, ...]]] = set()


def log_sequence_form(where: str, layer: nn.Module, records: list[sequence_lib.Ran]) -> None:
  """One log line per layer (and form: a train and an eval trace of the same form are one line) naming the
  sequence-parallel form `layer` ran: the forms its cores recorded with their details, or, when none recorded one,
  the form the layer declares for GSPMD's partitioning."""
  ran = [r for r in records if r.form is not None]
  forms = tuple(dict.fromkeys(r.form for r in ran))
  details = list(dict.fromkeys(f"{r.form}: {r.detail}" for r in ran))
  if not ran:
    declared = layer.sequence_parallel_form()
    forms = (declared or "fallback",)
    details = [f"{declared} (the layer's own work, partitioned by GSPMD)" if declared else
               f"fallback: {sequence_lib.NO_FORM}: {sequence_lib.FALLBACK}"]
  op = f"{where}/attention ({type(layer).__name__})"
  if (op, forms) not in _announced:
    _announced.add((op, forms))
    sequence_lib.log_once(op, "; ".join(details))


class Encoder(nn.Module):
  """Token sequence `[B, L]` (+ padding mask, True = real token) -> `[B, emb_dim]` pooled or `[B, L, emb_dim]`.

  Attributes:
    vocab_size, max_length: input vocabulary and the longest sequence (without the CLS token).
    pos_encoding: one of `lra.models.embeddings.POSITIONAL_ENCODINGS` ("learned", "sinusoidal" (Vaswani's),
      "lra_sinusoidal", "rope", "alibi", "none"); only "learned" is bounded by max_length.
    pooling: "cls" (a learned CLS vector prepended before the positional encoding, as LRA), "mean" (masked mean over
      real tokens) or "none" (return every position).
    attention: the per-layer `attention.AttentionSpec`s (`attention.resolve`; what `encoder_from_config` passes), or
      `{"name": <registered variant>, **the options the user set}`, resolved through the same gate when the encoder
      is constructed directly.
    causal / decode: passed to every attention layer (language modelling and autoregressive decoding).
    layer_options: per-layer attention options merged over `attention` (one mapping per layer), e.g. TransNormer's
      DiagAttention in early layers; they win over everything for their layer. None uses the variant's
      `default_layer_options(num_layers)` (its paper's architecture) for the options `attention` does not set
      (`attention.resolve`).
    remat: recompute each block's activations in the backward pass (memory for compute).
    reversible: RevNet residuals whose backward pass rebuilds activations (lra/models/reversible.py), so activation
      memory does not grow with depth. A different function from the ordinary pre-LN stack (two streams).
    post_ln: post-LN blocks (LayerNorm after each residual, no final LayerNorm) instead of pre-LN.
    sequence_output: return every input token's output `[B, L, emb_dim]` (the CLS position dropped) instead of the
      pooled vector, with the same parameters as the pooled encoder: what self-pretraining heads read
      (lra/training/pretrain.py), so a pretrained encoder loads into the classifier unchanged.
    dtype: compute dtype, a name of `kernels.common.DTYPE_NAMES` ("auto": `kernels.common.resolve_dtype`) or a
      jnp dtype.
  """

  vocab_size: int
  max_length: int
  emb_dim: int = 512
  num_layers: int = 4
  num_heads: int = 8
  qkv_dim: int = 512
  mlp_dim: int = 1024
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pos_encoding: str = "learned"
  pooling: str = "cls"
  attention: tuple[attention_lib.AttentionSpec, ...] | Mapping[str, Any] = ml_collections.FrozenConfigDict(
      {"name": "softmax"})
  causal: bool = False
  decode: bool = False
  remat: bool = False
  reversible: bool = False
  post_ln: bool = False
  sequence_output: bool = False
  layer_options: tuple[Mapping[str, Any], ...] | None = None
  dtype: Any = "float32"
  patch_size: int = 1  # > 1: inputs are `image_shape` pixel tokens embedded as p x p patches (lra/models/patches.py)
  image_shape: tuple[int, int] | None = None

  @property
  def compute_dtype(self) -> jnp.dtype:
    return resolve_dtype(self.dtype)

  def attention_specs(self) -> tuple[attention_lib.AttentionSpec, ...]:
    """Each layer's `attention.AttentionSpec`: the ones given (`encoder_from_config` resolves them once), else the
    gate's answer for the `attention` mapping and `layer_options` (registry defaults, the variant's per-layer
    schedule for what `attention` does not set, `attention`, then `layer_options`)."""
    if isinstance(self.attention, tuple) and all(isinstance(a, attention_lib.AttentionSpec) for a in self.attention):
      if len(self.attention) != self.num_layers:
        raise ValueError(f"Encoder: {len(self.attention)} attention specs for num_layers={self.num_layers}; give "
                         f"one per layer (attention.resolve(name, num_layers, options))")
      return self.attention
    user = dict(self.attention)
    name = user.pop("name", None)
    # Model-owned entries may only repeat the registry default or the encoder's own value.
    user = attention_lib.registry.owned_entries(name, user, {
        "num_heads": self.num_heads, "qkv_dim": self.qkv_dim, "causal": self.causal,
        "dropout_rate": self.attention_dropout_rate, "decode": self.decode, "dtype": self.compute_dtype,
        "positions": embeddings.layer_positions(self.pos_encoding)})
    return attention_lib.resolve(name, self.num_layers, user, layer_options=self.layer_options)

  def attention_for_layers(self) -> list[dict[str, Any]]:
    """Each layer's `{"name": ..., **options}` (`AttentionSpec.record`): what config.json records."""
    return [spec.record() for spec in self.attention_specs()]

  def shared_layer_inputs(self, per_layer: tuple[attention_lib.AttentionSpec, ...],
                          length: int) -> list[dict[str, jax.Array]]:
    """Parameters the encoder owns once for every layer, as each layer's extra call arguments: a variant that shares
    across layers (Linformer's `sharing="layerwise"`) defines `shared_layer_inputs(module, layer_options, length)`."""
    hook = getattr(per_layer[0].cls, "shared_layer_inputs", None)
    return hook(self, per_layer, length) if hook else [{} for _ in per_layer]

  @nn.compact
  def __call__(self, inputs_BxL: jax.Array, mask_BxL: jax.Array | None = None, *, train: bool = False) -> jax.Array:
    if self.pooling not in POOLINGS:
      raise ValueError(f"unknown pooling {self.pooling!r}; valid choices: {POOLINGS}")
    if self.pooling == "cls" and self.causal and not self.sequence_output:
      raise ValueError("pooling='cls' prepends a token that a causal encoder could never attend from; use 'mean' or "
                       "'none' with causal=True")
    if inputs_BxL.ndim != 2:
      raise ValueError(f"Encoder expects integer tokens of shape [batch, length], got shape {inputs_BxL.shape}")
    if not self.decode:
      embeddings.check_length(self.pos_encoding, inputs_BxL.shape[1], self.max_length)
    deterministic = not train
    dtype = self.compute_dtype
    if mask_BxL is None:
      mask_BxL = jnp.ones(inputs_BxL.shape, bool)
    mask_BxL = mask_BxL.astype(bool)
    # Context parallelism: the host feeds row-sharded tokens; from the first op on, the length is sharded too.
    inputs_BxL, mask_BxL = sequence_lib.constrain(inputs_BxL), sequence_lib.constrain(mask_BxL)

    patches.check_patch_size(self.patch_size, self.image_shape)
    if self.patch_size > 1:  # positions over the patch grid
      x, mask_BxL = patches.PatchEmbedding(self.image_shape, self.patch_size, self.emb_dim, dtype,
                                           name="patches")(inputs_BxL, mask_BxL)
    else:
      x = nn.Embed(self.vocab_size, self.emb_dim, embedding_init=nn.initializers.normal(stddev=1.0), dtype=dtype,
                   param_dtype=jnp.float32, name="embed")(inputs_BxL)
    max_length = self.max_length if self.patch_size == 1 else x.shape[1]
    if self.pooling == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.emb_dim))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.emb_dim)).astype(x.dtype), x], axis=1)
      mask_BxL = jnp.concatenate([jnp.ones_like(mask_BxL[:, :1]), mask_BxL], axis=1)
      max_length += 1
    # During decoding the cache remembers how many positions were consumed, to offset the positional encoding.
    decode_position = None
    if self.decode:
      initialized = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      if initialized:
        decode_position = position.value
        position.value = position.value + x.shape[1]
    x = PositionalEncoding(self.pos_encoding, max_length, name="pos_encoding")(x, decode_position)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    # Context parallelism: activations sharded along the length from here on (a length that mesh.sequence does not
    # divide is sharded unevenly by GSPMD; shard_map'd attention cores pad it with masked keys themselves).
    x, mask_BxL = sequence_lib.constrain(x), sequence_lib.constrain(mask_BxL)

    if self.reversible:
      if self.decode or self.post_ln:
        raise ValueError("reversible=True supports neither decode nor post_ln; use the ordinary encoder for those")
      if embeddings.layer_positions(self.pos_encoding) != "none":
        raise ValueError(f"reversible=True does not support pos_encoding={self.pos_encoding!r} (applied inside "
                         f"attention); use learned, sinusoidal or lra_sinusoidal with reversible blocks")
      per_layer = self.attention_specs()
      x = ReversibleBlocks(per_layer, self.num_heads, self.qkv_dim, self.mlp_dim,
                           self.dropout_rate, self.attention_dropout_rate, self.causal, dtype=dtype,
                           name="reversible")(
                               x, mask_BxL, deterministic, self.shared_layer_inputs(per_layer, x.shape[1]))
    else:
      block_cls = nn.remat(EncoderBlock, static_argnums=(3,)) if self.remat else EncoderBlock
      per_layer = self.attention_specs()
      for i, (layer_attention, shared) in enumerate(zip(per_layer, self.shared_layer_inputs(per_layer, x.shape[1]))):
        x = block_cls(attention=layer_attention, num_heads=self.num_heads, qkv_dim=self.qkv_dim,
                      mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                      attention_dropout_rate=self.attention_dropout_rate, causal=self.causal, decode=self.decode,
                      post_ln=self.post_ln, dtype=dtype, positions=embeddings.layer_positions(self.pos_encoding),
                      name=f"block_{i}")(x, mask_BxL, deterministic, shared)
    if not self.post_ln:
      x = layer_norm("ln_final", dtype)(x)

    if self.sequence_output:
      return x[:, 1:] if self.pooling == "cls" else x
    if self.pooling == "cls":
      return x[:, 0]
    if self.pooling == "mean":
      weights = mask_BxL.astype(jnp.float32)[..., None]  # the sum over the sequence in float32
      pooled = jnp.sum(x.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
      return pooled.astype(dtype)
    return x


def encoder_from_config(model_config: ml_collections.ConfigDict, *, vocab_size: int, max_length: int,
                        **overrides: Any) -> Encoder:
  """Builds the encoder from `config.model` (see configs/); `overrides` set fields such as pooling or causal.

  `config.model.dtype` (`kernels.common.DTYPE_NAMES`; default float32) is resolved here, so "auto" means the backend
  the model is built on."""
  attention = model_config.attention
  attention = dict(attention.to_dict() if hasattr(attention, "to_dict") else attention)
  kwargs = dict(vocab_size=vocab_size, max_length=max_length, emb_dim=model_config.emb_dim,
                num_layers=model_config.num_layers, num_heads=model_config.num_heads,
                qkv_dim=model_config.qkv_dim, mlp_dim=model_config.mlp_dim,
                dropout_rate=model_config.dropout_rate, attention_dropout_rate=model_config.attention_dropout_rate,
                pos_encoding=model_config.pos_encoding, pooling=model_config.pooling,
                attention=ml_collections.FrozenConfigDict(attention), remat=model_config.get("remat", False),
                reversible=model_config.get("reversible", False), post_ln=model_config.get("post_ln", False),
                dtype=resolve_dtype(model_config.get("dtype", "float32")), patch_size=model_config.get("patch_size", 1))
  layer_options = model_config.get("layer_options")
  if layer_options is not None:
    kwargs["layer_options"] = tuple(dict(o) for o in layer_options)
  kwargs.update(overrides)
  encoder = Encoder(**kwargs)
  if "attention" in overrides:
    return encoder
  # The gate runs once here (its answer is shared with the config check and config.json's record); the encoder and
  # its blocks build their layers from these specs.
  return encoder.clone(attention=encoder.attention_specs(), layer_options=None)
