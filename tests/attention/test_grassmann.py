"""Grassmann flow layer: contract, causality, decode, Plücker coordinates, averaging before projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention.grassmann import plucker_coordinates
from tests.attention import contract

OPTIONS = [{}, {"offsets": (1, 3), "reduced_dim": 4}, {"normalize": False, "reduced_dim": 6}]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_layer_contract_and_decode(options):
  contract.check_shape("grassmann", **options)
  contract.check_padding_by_gradient("grassmann", **options)
  contract.check_causal_by_gradient("grassmann", **options)
  contract.check_decode_equals_parallel("grassmann", **options)


def test_causal_leaks_nothing_but_non_causal_sees_both_directions():
  x = jax.random.normal(jax.random.key(0), (1, 8, 16))
  for causal in (True, False):
    layer, variables = contract.init_layer("grassmann", x, causal=causal, offsets=(1, 2), reduced_dim=4)
    jac = jax.jacrev(lambda x: layer.apply(variables, x)[0])(x)[:, :, 0]
    dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))
    future = np.triu(dep, 1).sum()
    assert (future == 0) if causal else (future > 0)
    # Position 4 depends exactly on itself and its partners at the offsets.
    expected = {4, 3, 2} if causal else {2, 3, 4, 5, 6}
    assert set(np.nonzero(dep[4])[0]) == expected


def test_plucker_coordinates_of_a_known_pair():
  e = np.eye(4, dtype=np.float32)
  p = np.asarray(plucker_coordinates(jnp.asarray(e[0]), jnp.asarray(e[1])))
  # Pairs in order (0,1), (0,2), (0,3), (1,2), (1,3), (2,3): only p_01 = 1.
  np.testing.assert_array_equal(p, [1, 0, 0, 0, 0, 0])
  u, v = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
  np.testing.assert_allclose(plucker_coordinates(jnp.asarray(u), jnp.asarray(v)),
                             [1 * 5 - 2 * 4, 1 * 6 - 3 * 4, 2 * 6 - 3 * 5])
  # Antisymmetric, and invariant (up to the determinant) under a change of basis of the plane.
  np.testing.assert_allclose(plucker_coordinates(jnp.asarray(v), jnp.asarray(u)), -plucker_coordinates(u, v))
  np.testing.assert_allclose(plucker_coordinates(jnp.asarray(u + v), jnp.asarray(v)), plucker_coordinates(u, v))


def test_averaging_before_projection_equals_projecting_each_offset():
  x = jax.random.normal(jax.random.key(1), (2, 10, 16))
  mask = jnp.arange(10)[None, :] < jnp.array([[7], [10]])
  offsets = (1, 2, 4)
  layer, variables = contract.init_layer("grassmann", x, causal=True, offsets=offsets, reduced_dim=5)
  got = layer.apply(variables, x, mask=mask)

  p = jax.tree.map(np.asarray, variables["params"])
  z = np.asarray(x) @ p["reduce"]["kernel"] + p["reduce"]["bias"]
  want = np.zeros_like(np.asarray(x))
  for bi in range(2):
    for t in range(10):
      projected = []
      for d in offsets:
        s = t - d
        if s < 0 or not mask[bi, s]:
          continue
        coords = np.asarray(plucker_coordinates(jnp.asarray(z[bi, t]), jnp.asarray(z[bi, s])))
        coords = coords / max(np.linalg.norm(coords), 1e-6)
        projected.append(coords @ p["project"]["kernel"] + p["project"]["bias"])  # one projection per offset
      g = np.mean(projected, axis=0) if projected else np.zeros(16)
      h = np.asarray(x[bi, t])
      a = 1 / (1 + np.exp(-(np.concatenate([h, g]) @ p["gate"]["kernel"] + p["gate"]["bias"])))
      want[bi, t] = a * h + (1 - a) * g
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bad_offsets():
  with pytest.raises(ValueError, match="offsets must be"):
    attention.build("grassmann", offsets=(0, 2)).init(jax.random.key(0), jnp.ones((1, 4, 8)))
