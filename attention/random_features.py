"""Orthogonal random features drawn with plain jnp (no LAPACK), safe to trace into compiled training steps.

`jnp.linalg.qr` lowers on XLA:CPU to jaxlib's LAPACK custom call, whose batched form fans the batch out into the
intra-op thread pool it runs on; with a 2-thread pool both threads can end up waiting for work queued behind
themselves, and the training step deadlocks. Orthogonalizing with matmuls and elementwise ops only (classical
Gram-Schmidt applied twice, "twice is enough": orthogonal to float32 rounding for any numerically full-rank matrix)
keeps the compiled step free of custom calls on every backend.

Distribution: Gram-Schmidt of the rows of a Gaussian matrix (which yields the Q factor with a positive R diagonal)
gives a Haar-distributed orthogonal matrix. Each block of `dim` orthonormal rows is then rescaled row by row by the
norm of an independent `dim`-dimensional Gaussian vector (chi distributed with `dim` degrees of freedom), so every
row has the length distribution of an iid Gaussian row while the rows of a block stay exactly orthogonal
(Choromanski et al. 2021, "orthogonal random features").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def orthonormalize_rows(x_NxKxD: jax.Array) -> jax.Array:
  """Orthonormal rows spanning the rows of each `[K, D]` matrix (`K <= D`), by classical Gram-Schmidt twice.

  Row `j` of the result is row `j` of the input minus its projections on rows `< j`, normalized: the Q of a QR
  decomposition (of the transpose) with a positive R diagonal. Computed in float32 with one `fori_loop` over rows
  whose body is two matrix-vector products, so it lowers to dots and elementwise ops only (no custom calls).
  """
  *batch, num_rows, dim = x_NxKxD.shape
  if num_rows > dim:
    raise ValueError(f"cannot orthonormalize {num_rows=} rows of length {dim=}: at most {dim} rows are orthogonal")
  x = x_NxKxD.astype(jnp.float32)
  tiny = jnp.finfo(jnp.float32).tiny

  def body(j, q):
    v = x[..., j, :]
    # Rows >= j of q are still zero, so projecting on all of q projects on the finished rows only.
    for _ in range(2):  # the second pass removes what the first left behind through rounding
      v = v - jnp.einsum("...k,...kd->...d", jnp.einsum("...kd,...d->...k", q, v), q)
    v = v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), tiny))
    return q.at[..., j, :].set(v)

  return jax.lax.fori_loop(0, num_rows, body, jnp.zeros((*batch, num_rows, dim), jnp.float32))


def orthogonal_random_matrix(key: jax.Array, num_features: int, dim: int, orthogonal: bool = True) -> jax.Array:
  """`[num_features, dim]` float32 projection: blocks of `dim` orthonormal (Haar) rows, each row rescaled by a chi
  (`dim` degrees of freedom) norm, the last block truncated; `orthogonal=False` gives iid standard Gaussian rows."""
  if num_features < 1 or dim < 1:
    raise ValueError(f"num_features and dim must be >= 1, got {num_features=}, {dim=}")
  block_key, norm_key = jax.random.split(key)
  if not orthogonal:
    return jax.random.normal(block_key, (num_features, dim))
  num_blocks = math.ceil(num_features / dim)
  gaussian_NxDxD = jax.random.normal(block_key, (num_blocks, dim, dim))
  rows = orthonormalize_rows(gaussian_NxDxD).reshape(num_blocks * dim, dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim)), axis=1)
  return rows * norms[:, None]
