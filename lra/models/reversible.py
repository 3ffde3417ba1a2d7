"""Reversible residual blocks (RevNet, as in the Reformer): activation memory that does not grow with depth.

Two streams start as copies of the input; each block computes
  y1 = x1 + F(x2)      F = LN -> attention -> dropout
  y2 = x2 + G(y1)      G = LN -> MLP -> dropout
and the output is the mean of the two streams. A `jax.custom_vjp` keeps only the last block's outputs: the backward
pass rebuilds each block's inputs from its outputs (x2 = y2 - G(y1), x1 = y1 - F(x2)) and recomputes F and G to get
their gradients, so no per-block activation is stored. Dropout and attention randomness are drawn from keys fixed per
block, so the recomputation sees the same masks.

Limitation: the attention variant may only have `params` (no other variable collections, e.g. Performer's
`attention_state`), because the custom VJP threads parameters explicitly.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import attention as attention_lib
from lra.models.mlp import MlpBlock


class AttentionBranch(nn.Module):
  """F: LN -> attention -> dropout."""

  attention: attention_lib.AttentionSpec
  num_heads: int
  qkv_dim: int
  dropout_rate: float
  attention_dropout_rate: float
  causal: bool = False
  dtype: Any = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x, mask, deterministic: bool, shared: Mapping[str, jax.Array] | None = None):
    layer = self.attention.build(num_heads=self.num_heads, qkv_dim=self.qkv_dim, causal=self.causal,
                                 dropout_rate=self.attention_dropout_rate, dtype=self.dtype, name="attention")
    ln = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_attention")
    y = layer(ln(x), mask=mask, deterministic=deterministic, **dict(shared or {}))
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class MlpBranch(nn.Module):
  """G: LN -> MLP -> dropout."""

  mlp_dim: int
  dropout_rate: float
  dtype: Any = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x, deterministic: bool):
    ln = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_mlp")
    y = MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype, name="mlp")(ln(x), deterministic)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


def reversible_stack(fs: Sequence[Callable], g: Callable, recompute: bool = True) -> Callable:
  """`run(params, x1, x2, mask, rngs) -> (y1, y2)` over blocks `params[i] = {"f": ..., "g": ...}`.

  `fs[i](params_f, x, mask, rngs_i)` (block i's attention branch) and `g(params_g, x, rngs_i)` are pure; `rngs[i]`
  are block i's keys. With `recompute=False` plain autodiff is used (storing every activation): the reference the
  custom VJP is tested against.
  """

  def forward(params, x1, x2, mask, rngs):
    for f, p, r in zip(fs, params, rngs):
      x1 = x1 + f(p["f"], x2, mask, r)
      x2 = x2 + g(p["g"], x1, r)
    return x1, x2

  if not recompute:
    return forward

  @jax.custom_vjp
  def run(params, x1, x2, mask, rngs):
    return forward(params, x1, x2, mask, rngs)

  def run_fwd(params, x1, x2, mask, rngs):
    y1, y2 = forward(params, x1, x2, mask, rngs)
    return (y1, y2), (params, y1, y2, mask, rngs)

  def run_bwd(residuals, cotangents):
    params, y1, y2, mask, rngs = residuals
    dy1, dy2 = cotangents
    grads = [None] * len(params)
    for i in reversed(range(len(params))):
      f, p, r = fs[i], params[i], rngs[i]
      g_y1, g_vjp = jax.vjp(lambda pg, h: g(pg, h, r), p["g"], y1)  # noqa: B023
      x2 = y2 - g_y1  # rebuild the block's inputs from its outputs
      d_pg, d_h = g_vjp(dy2)
      dy1 = dy1 + d_h
      f_x2, f_vjp = jax.vjp(lambda pf, h: f(pf, h, mask, r), p["f"], x2)  # noqa: B023
      x1 = y1 - f_x2
      d_pf, d_x2 = f_vjp(dy1)
      dy2 = dy2 + d_x2
      grads[i] = {"f": d_pf, "g": d_pg}
      y1, y2 = x1, x2
    # Masks and keys are not differentiable: float0 zeros.
    no_grad = lambda tree: jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), tree)  # noqa: E731
    return grads, dy1, dy2, no_grad(mask), no_grad(rngs)

  run.defvjp(run_fwd, run_bwd)
  return run


class ReversibleBlocks(nn.Module):
  """The encoder's block stack with reversible residuals; parameters under `block_<i>/{f,g}`."""

  # Resolved once by the gate (attention.resolve, in the encoder); a `{"name": ..., **options}` mapping goes through it.
  attention_per_layer: Sequence[attention_lib.AttentionSpec | Mapping[str, Any]]
  num_heads: int
  qkv_dim: int
  mlp_dim: int
  dropout_rate: float
  attention_dropout_rate: float
  causal: bool = False
  recompute: bool = True
  dtype: Any = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool,
               shared_per_layer: Sequence[Mapping[str, jax.Array]] | None = None) -> jax.Array:
    """`shared_per_layer[i]`: arrays the encoder owns for all layers (Linformer's layerwise projection), passed to
    block i's attention call; each block's copy gets its own gradient and autodiff sums them into the one array."""
    shared_per_layer = list(shared_per_layer or [{} for _ in self.attention_per_layer])
    specs = [attention_lib.registry.spec_of(a) for a in self.attention_per_layer]  # specs pass through as they are
    fs = [AttentionBranch(a, self.num_heads, self.qkv_dim, self.dropout_rate, self.attention_dropout_rate,
                          self.causal, self.dtype, parent=None) for a in specs]
    g_module = MlpBranch(self.mlp_dim, self.dropout_rate, self.dtype, parent=None)
    params = []
    for i, f_module in enumerate(fs):
      def init(rng, f_module=f_module, shared=shared_per_layer[i]):
        f_vars = f_module.init({"params": rng, "attention": rng}, x, mask, True, shared)
        extra = set(f_vars) - {"params"}
        if extra:
          raise ValueError(f"reversible=True needs attention variants whose only variables are params; "
                           f"{f_module.attention.name!r} also has {sorted(extra)}")
        return {"f": f_vars["params"], "g": g_module.init(jax.random.fold_in(rng, 1), x, True)["params"]}
      params.append(self.param(f"block_{i}", init))

    streams = {}
    if not deterministic:
      streams["dropout"] = self.make_rng("dropout")
    if self.has_rng("attention"):
      streams["attention"] = self.make_rng("attention")
    rngs = [{k: jax.random.fold_in(v, i) for k, v in streams.items()} for i in range(len(fs))]

    # The shared arrays join each block's F parameters, so the custom VJP returns their gradients too.
    f_by_block = [lambda p, h, m, r, f=f: f.apply({"params": p["own"]}, h, m, deterministic, p["shared"], rngs=r)
                  for f in fs]
    g = lambda p, h, r: g_module.apply({"params": p}, h, deterministic, rngs=r)  # noqa: E731
    params = [{"f": {"own": p["f"], "shared": dict(s)}, "g": p["g"]} for p, s in zip(params, shared_per_layer)]
    y1, y2 = reversible_stack(f_by_block, g, self.recompute)(params, x, x, mask, rngs)
    return (y1 + y2) / 2
