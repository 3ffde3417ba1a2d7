"""Routing Transformer (Roy, Saffar, Vaswani, Grangier, TACL 2021): attention within clusters found by online
k-means over queries and keys.

Per routing head, `num_clusters` centroids (unit vectors) live in the non-trainable collection `attention_state`
(the trainer carries it in its state and checkpoints it, so a resumed run continues from the same centroids).
Queries and keys are normalized to unit length and routed as the paper's implementation does, with balanced
membership: each cluster takes the `ceil(L / num_clusters)` queries and, separately, the keys most similar to its
centroid (padded positions never), so a token may sit in several clusters or in none. A query attends to the keys
that share at least one cluster with it (causal: at or before it), softmax over that union (a pair that meets in
several clusters counts once: the scores are lowered by the log of the number of shared clusters, as Reformer does
for its rounds). Memberships are integer top-k, not differentiated; the scores are. Which keys share a query's
cluster depends on the whole sequence (later positions included), a discrete dependence with no gradient (as in
the paper), so decoding step by step could not reproduce it: `decode=True` is refused.

Centroids move by an exponential moving average, not by gradients: in training (`deterministic=False` with the
collection mutable), after the step's attention, each centroid becomes
`normalize(decay * mu + (1 - decay) * mean of the queries and keys nearest to it)` (clusters nothing is nearest to
keep their centroid), the k-means step of the paper with its decay.

`num_local_heads` heads (the first ones) use local attention over a window of `local_window` tokens instead, as the
paper mixes local and routing heads. The paper's defaults: half the heads local (window 256 on Wikitext-103 / PG-19),
`num_clusters` about sqrt(L) (its complexity argument: O(L^1.5 d)), decay 0.999; `num_clusters=0` is sqrt of the
length seen at `init`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention import adaptive_sparse as core
from attention.base import AttentionLayer
from attention.registry import register
from attention.ranges import Constraint, Integer, OneOf, Real
from kernels.common import MASK_VALUE, dropout_keep

STATE = "attention_state"  # the non-trainable collection the trainer carries (performer's features live there too)


def unit(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def kmeans_update(centroids_HxKxD: jax.Array, qn_BxLxHxD: jax.Array, kn_BxLxHxD: jax.Array, real_BxL: jax.Array,
                  decay: float) -> jax.Array:
  """One online k-means step: every real query and key goes to its nearest centroid; each centroid moves to
  `decay * mu + (1 - decay) * mean(assigned)` and is renormalized (unassigned centroids stay)."""
  k = centroids_HxKxD.shape[1]
  x = jnp.concatenate([qn_BxLxHxD, kn_BxLxHxD], axis=1).astype(jnp.float32)  # [B, 2L, H, D]
  real = jnp.concatenate([real_BxL, real_BxL], axis=1)
  nearest = jnp.argmax(jnp.einsum("blhd,hkd->blhk", x, centroids_HxKxD), axis=-1)  # [B, 2L, H]
  onehot = jax.nn.one_hot(nearest, k, dtype=jnp.float32) * real[..., None, None]  # [B, 2L, H, K]
  sums = jnp.einsum("blhk,blhd->hkd", onehot, x)
  counts = jnp.sum(onehot, axis=(0, 1))[..., None]  # [H, K, 1]
  moved = decay * centroids_HxKxD + (1.0 - decay) * sums / jnp.maximum(counts, 1.0)
  return unit(jnp.where(counts > 0, moved, centroids_HxKxD))


def memberships(x_BxLxHxD: jax.Array, centroids_HxKxD: jax.Array, real_BxL: jax.Array, size: int) -> jax.Array:
  """Balanced membership: per head and cluster, the `size` positions most similar to the centroid, `[B, H, K, w]`
  (-1 where fewer real positions exist). Ties go to the lower position."""
  sim = jnp.einsum("blhd,hkd->bhkl", jax.lax.stop_gradient(x_BxLxHxD).astype(jnp.float32), centroids_HxKxD)
  sim = jnp.where(real_BxL[:, None, None, :], sim, -jnp.inf)
  values, idx = jax.lax.top_k(sim, size)
  return jnp.where(values == -jnp.inf, -1, idx).astype(jnp.int32)


def membership_matrix(members_BxHxKxW: jax.Array, length: int) -> jax.Array:
  """`[B, H, L, K]` bool: position l is a member of cluster k."""
  b, h, k, w = members_BxHxKxW.shape
  onehot = (members_BxHxKxW[..., None] == jnp.arange(length)) & (members_BxHxKxW[..., None] >= 0)  # [B,H,K,w,L]
  return jnp.any(onehot, axis=3).transpose(0, 1, 3, 2)


def routing_mask(q_members: jax.Array, k_members: jax.Array, length: int, *, causal: bool,
                 real_BxL: jax.Array) -> jax.Array:
  """The token mask routing attention stands for: `[B, H, L, L]`, query and key share a cluster."""
  mq, mk = membership_matrix(q_members, length), membership_matrix(k_members, length)
  allowed = jnp.einsum("bhlk,bhsk->bhls", mq.astype(jnp.int32), mk.astype(jnp.int32)) > 0
  if causal:
    allowed = allowed & (jnp.arange(length)[None, :] <= jnp.arange(length)[:, None])
  return allowed & real_BxL[:, None, None, :]


def clustered_attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, q_members: jax.Array,
                        k_members: jax.Array, *, causal: bool, real_BxL: jax.Array, scale: float,
                        dropout_rate: float = 0.0, dropout_seed_: jax.Array | None = None) -> jax.Array:
  """Attention within clusters, gathered: each cluster's `w` queries against its `w` keys, merged per query over
  its clusters by log-sum-exp (union semantics: the log-count correction). Float32 `[B, L, H, D]`; dropout is the
  counter hash of (batch * H + head, query position, key position), as in `adaptive_sparse`."""
  b, length, h, d = q_BxLxHxD.shape
  mq, mk = membership_matrix(q_members, length), membership_matrix(k_members, length)  # [B, H, L, K]

  def gather(t_BxLxHx_, idx_BxHxKxW):
    t = jnp.moveaxis(t_BxLxHx_, 2, 1)  # [B, H, L, ...]
    flat = jnp.maximum(idx_BxHxKxW, 0).reshape(b, h, -1)
    out = jax.vmap(jax.vmap(lambda tt, i: tt[i]))(t, flat)
    return out.reshape(*idx_BxHxKxW.shape, *t.shape[3:])

  qc = gather(q_BxLxHxD.astype(jnp.float32), q_members)  # [B, H, K, w, D]
  kc, vc = gather(k_BxLxHxD.astype(jnp.float32), k_members), gather(v_BxLxHxD.astype(jnp.float32), k_members)
  qpos, kpos = jnp.maximum(q_members, 0), jnp.maximum(k_members, 0)
  rows = lambda m: m.astype(jnp.float32).transpose(0, 2, 1, 3)  # noqa: E731  [B, H, L, K] -> [B, L, H, K]
  shared = jnp.einsum("bhcik,bhcjk->bhcij", gather(rows(mq), q_members), gather(rows(mk), k_members))
  kreal = jax.vmap(lambda r, i: r[i])(real_BxL, kpos.reshape(b, -1)).reshape(kpos.shape)
  allowed = (q_members >= 0)[..., :, None] & (k_members >= 0)[..., None, :] & kreal[..., None, :]
  if causal:
    allowed = allowed & (kpos[..., None, :] <= qpos[..., :, None])
  scores = jnp.einsum("bhcid,bhcjd->bhcij", qc, kc) * scale - jnp.log(jnp.maximum(shared, 1.0))
  scores = jnp.where(allowed, scores, MASK_VALUE)
  m = jnp.max(scores, axis=-1, keepdims=True)
  e = jnp.where(allowed, jnp.exp(scores - m), 0.0)
  s = jnp.sum(e, axis=-1, keepdims=True)
  lse = jnp.where(s[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(s > 0, s, 1.0))[..., 0], -jnp.inf)  # [B,H,K,w]
  weights = e / jnp.where(s > 0, s, 1.0)
  if dropout_seed_ is not None and dropout_rate > 0.0:
    bh = (jnp.arange(b)[:, None] * h + jnp.arange(h)[None, :])[:, :, None, None, None]
    keep = dropout_keep(dropout_seed_, bh, qpos[..., :, None], kpos[..., None, :], dropout_rate)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  out_c = jnp.einsum("bhcij,bhcjd->bhcid", weights, vc)
  # Merge every query's clusters: weights exp(lse_c - lse_total), by scatter over positions.
  pos = jnp.where(q_members >= 0, q_members, length).reshape(b, h, -1)  # invalid members go to a spare slot
  lse_flat = lse.reshape(b, h, -1)
  scatter = jax.vmap(jax.vmap(lambda buf, i, x, op: getattr(buf.at[i], op)(x), in_axes=(0, 0, 0, None)),
                     in_axes=(0, 0, 0, None))
  top = jax.lax.stop_gradient(scatter(jnp.full((b, h, length + 1), -jnp.inf), pos, lse_flat, "max"))
  top_at = jnp.take_along_axis(top, pos, axis=-1)
  w = jnp.where(lse_flat > -jnp.inf, jnp.exp(lse_flat - jnp.where(top_at > -jnp.inf, top_at, 0.0)), 0.0)
  denom = scatter(jnp.zeros((b, h, length + 1)), pos, w, "add")
  num = jax.vmap(jax.vmap(lambda buf, i, x: buf.at[i].add(x)))(jnp.zeros((b, h, length + 1, d)), pos,
                                                              w[..., None] * out_c.reshape(b, h, -1, d))
  out = num[:, :, :length] / jnp.where(denom[:, :, :length] > 0, denom[:, :, :length], 1.0)[..., None]
  return out.transpose(0, 2, 1, 3)


@register("routing")
class RoutingAttention(AttentionLayer):
  """Attributes: num_clusters (0 = sqrt of the init length), num_local_heads (None = half the heads),
  local_window (256), ema_decay (0.999), implementation ("xla": gathered clusters; "reference": the dense token
  mask of the same memberships)."""

  num_clusters: int = 0
  num_local_heads: int | None = None
  local_window: int = 256
  ema_decay: float = 0.999
  implementation: str = "xla"
  option_ranges = {"implementation": OneOf(("xla", "reference"), what="routing implementation"),
                   "num_clusters": Integer(0), "num_local_heads": Integer(0, allow_none=True),
                   "local_window": Integer(1), "ema_decay": Real(0.0, 1.0)}
  # Against the model's num_heads: checked by the gate when the layer is built (and by the config validation), not
  # at every call.
  option_constraints = (
      Constraint("num_local_heads", ("num_heads",), lambda num_heads: Integer(0, num_heads, allow_none=True),
                 why="the first num_local_heads heads attend locally, the others by clusters; use num_local_heads <= "
                     "num_heads, or None for half the heads"),
  )

  not_decode_reason = "memberships depend on the whole sequence"

  @property
  def local_heads(self) -> int:
    return self.num_heads // 2 if self.num_local_heads is None else self.num_local_heads

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    b, length, features = x.shape
    q, k, v = self.project_qkv(x)
    d = q.shape[-1]
    hl, hr = self.local_heads, self.num_heads - self.local_heads
    real = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
    drop = self.dropout_rng(deterministic)
    seed = drop  # a key: each branch folds in its own
    rate = self.dropout_rate if seed is not None else 0.0
    outs = []
    if hl:
      outs.append(core.window_attention(q[:, :, :hl], k[:, :, :hl], v[:, :, :hl], window=self.local_window,
                                        causal=self.causal, key_mask_BxS=real, scale=d ** -0.5, dropout_rate=rate,
                                        dropout_seed=core.branch_seed(seed, 0),
                                        implementation=self.implementation))
    if hr:
      clusters = self.num_clusters or max(1, round(math.sqrt(length)))
      centroids = self.variable(STATE, "centroids", lambda: unit(jax.random.normal(
          self.make_rng("params"), (hr, clusters, d), jnp.float32)))
      mu = centroids.value
      if mu.shape[1] > length:
        raise ValueError(f"routing: num_clusters={mu.shape[1]} is larger than the sequence ({length}); use "
                         f"num_clusters <= {length}")
      size = -(-length // mu.shape[1])
      qr, kr, vr = q[:, :, hl:], k[:, :, hl:], v[:, :, hl:]
      qn, kn = jax.lax.stop_gradient(unit(qr.astype(jnp.float32))), jax.lax.stop_gradient(unit(kr.astype(jnp.float32)))
      q_members, k_members = memberships(qn, mu, real, size), memberships(kn, mu, real, size)
      self.sow("intermediates", "members", (q_members, k_members))
      kw = dict(scale=d ** -0.5, dropout_rate=rate)
      if self.implementation == "reference":
        allowed = routing_mask(q_members, k_members, length, causal=self.causal, real_BxL=real)
        outs.append(core.masked_attention_reference(qr, kr, vr, allowed, dropout_seed=core.branch_seed(seed, 1),
                                                    **kw))
      else:
        outs.append(clustered_attention(qr, kr, vr, q_members, k_members, causal=self.causal, real_BxL=real,
                                        dropout_seed_=core.branch_seed(seed, 1), **kw))
      if not deterministic and self.is_mutable_collection(STATE) and not self.is_initializing():
        centroids.value = kmeans_update(mu, qn, kn, real, self.ema_decay)
    y = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return self.project_out(y, features)


__all__ = ["RoutingAttention", "clustered_attention", "kmeans_update", "memberships", "routing_mask"]
