"""Grassmann flow layer: contract, causality, decode, Plücker coordinates, averaging before projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention.grassmann import plucker_coordinates
from tests.attention import contract

def test_unnormalized_coordinates_keep_the_layer_contract():
  # The contract suite runs the normalized default; this is the other code path.
  options = {"normalize": False, "reduced_dim": 6}
  contract.check_layer("grassmann", **options)
  contract.check_causal("grassmann", **options)
  contract.check_decode("grassmann", **options)


def test_causal_leaks_nothing_but_non_causal_sees_both_directions():
  x = jax.random.normal(jax.random.key(0), (1, 8, 16))
  for causal in (True, False):
    layer, variables = contract.init_layer("grassmann", x, causal=causal, offsets=(1, 2), reduced_dim=4)
    jac = jax.jit(jax.jacrev(lambda x: layer.apply(variables, x)[0]))(x)[:, :, 0]
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
  got = jax.jit(layer.apply)(variables, x, mask=mask)

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


# ---- Options (issue 16): gate input, learned mixing, and the paper's ablations --------------------------------------

# Every pair of option values, with the default (hidden_and_geometry, mean, Plücker, gate: the contract suite's
# case): each option acts at its own place (mixing: the partner weights; use_plucker: the pair feature; the gate: the
# output), in the parallel and the decoding forms alike, so pairs of values cover their interactions (the full
# product, 11 cases, took 2.5x the time).
OPTION_GRID = [{"gate_input": g, "mixing": m, "use_plucker": p, "use_gate": u} for g, m, p, u in (
    ("geometry", "learned", True, True), ("hidden_and_geometry", "learned", False, True),
    ("geometry", "mean", False, True), ("hidden_and_geometry", "mean", True, False),
    ("hidden_and_geometry", "learned", False, False))]
SMALL = {"reduced_dim": 4, "offsets": (1, 3)}


def _perturbed(variables):
  """Random learned-mixing logits, so the weights are not the mean they start as."""
  params = dict(variables["params"])
  if "offset_logits" in params:
    params["offset_logits"] = jax.random.normal(jax.random.key(11), params["offset_logits"].shape) * 2.0
  return {**variables, "params": params}


@pytest.mark.parametrize("options", OPTION_GRID,
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_combination_keeps_padding_causality_and_decode(options):
  options = {**SMALL, **options}
  contract.check_padding_by_gradient("grassmann", length=9, num_real=5, features=8, **options)
  contract.check_causal_by_gradient("grassmann", length=8, features=8, **options)
  # Decode equals the parallel causal output, with learned weights away from their (uniform) init.
  x = jax.random.normal(jax.random.key(9), (2, 7, 8))
  layer, variables = contract.init_layer("grassmann", x, causal=True, **options)
  variables = _perturbed(variables)
  expected = jax.jit(layer.apply)(variables, x)
  np.testing.assert_allclose(contract.decode_steps("grassmann", variables, x, **options), expected, atol=2e-5,
                             rtol=1e-5)


def test_option_parameters():
  x = jnp.ones((1, 6, 8))
  def shapes(**o):
    variables = jax.eval_shape(attention.build("grassmann", **SMALL, **o).init, jax.random.key(0), x)
    return jax.tree.map(lambda a: a.shape, variables)["params"]
  default = shapes()
  assert default["gate"]["kernel"] == (16, 8) and default["project"]["kernel"] == (6, 8)  # [h; g] -> gate; C(4, 2)
  assert shapes(gate_input="geometry")["gate"]["kernel"] == (8, 8)
  assert "gate" not in shapes(use_gate=False)
  assert shapes(use_plucker=False)["project"]["kernel"] == (4, 8)  # z_s itself
  assert shapes(mixing="learned")["offset_logits"] == (2, 2)  # (t - d, t + d) x offsets
  assert shapes(mixing="learned", causal=True)["offset_logits"] == (1, 2)
  assert "offset_logits" not in default
  for bad in ({"gate_input": "hidden"}, {"mixing": "max"}):
    with pytest.raises(ValueError, match="valid choices"):
      attention.build("grassmann", **bad).init(jax.random.key(0), x)


def test_learned_mixing_is_a_softmax_over_valid_partners_and_starts_as_the_mean():
  x = jax.random.normal(jax.random.key(1), (2, 10, 8))
  mask = jnp.arange(10)[None, :] < jnp.array([[7], [10]])
  offsets = (1, 2, 4)
  layer, variables = contract.init_layer("grassmann", x, causal=True, offsets=offsets, reduced_dim=4,
                                         mixing="learned")
  mean_layer = attention.build("grassmann", causal=True, offsets=offsets, reduced_dim=4)
  init_params = {k: v for k, v in variables["params"].items() if k != "offset_logits"}
  apply = jax.jit(layer.apply)
  np.testing.assert_allclose(apply(variables, x, mask=mask), jax.jit(mean_layer.apply)({"params": init_params}, x,
                                                                                       mask=mask), atol=1e-6)
  variables = _perturbed(variables)
  got = apply(variables, x, mask=mask)
  p = jax.tree.map(np.asarray, variables["params"])
  z = np.asarray(x) @ p["reduce"]["kernel"] + p["reduce"]["bias"]
  want = np.zeros_like(np.asarray(x))
  for bi in range(2):
    for t in range(10):
      feats, logits = [], []
      for i, d in enumerate(offsets):
        s = t - d
        if s >= 0 and mask[bi, s]:
          coords = np.asarray(plucker_coordinates(jnp.asarray(z[bi, t]), jnp.asarray(z[bi, s])))
          feats.append(coords / max(np.linalg.norm(coords), 1e-6))
          logits.append(p["offset_logits"][0, i])
      if feats:
        w = np.exp(np.array(logits) - max(logits))
        g = (w / w.sum()) @ np.array(feats) @ p["project"]["kernel"] + p["project"]["bias"]
      else:
        g = np.zeros(8)
      h = np.asarray(x[bi, t])
      a = 1 / (1 + np.exp(-(np.concatenate([h, g]) @ p["gate"]["kernel"] + p["gate"]["bias"])))
      want[bi, t] = a * h + (1 - a) * g
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_ablations_compute_what_they_say():
  x = jax.random.normal(jax.random.key(2), (1, 6, 8))
  # No gate: out = h + g; geometry-only gate: the gate does not read h (zero its g-part and it is constant).
  layer, variables = contract.init_layer("grassmann", x, causal=True, use_gate=False, **SMALL)
  with_gate, gate_vars = contract.init_layer("grassmann", x, causal=True, **SMALL)
  params = {k: v for k, v in gate_vars["params"].items()}
  params["gate"] = {"kernel": jnp.zeros_like(params["gate"]["kernel"]), "bias": jnp.zeros_like(params["gate"]["bias"])}
  g_half = jax.jit(with_gate.apply)({"params": params}, x)  # a = 1/2: (h + g) / 2
  no_gate = jax.jit(layer.apply)({"params": {k: params[k] for k in ("reduce", "project")}}, x)
  np.testing.assert_allclose(no_gate, 2 * g_half, rtol=1e-5, atol=1e-6)
  # No Plücker: each position's feature depends on the partner's reduced state only, not on its own.
  layer, variables = contract.init_layer("grassmann", x, causal=True, use_plucker=False, use_gate=False, **SMALL)
  jac = jax.jit(jax.jacrev(lambda x: layer.apply(variables, x)[0]))(x)[:, :, 0]
  dep = np.abs(np.asarray(jac)).sum(axis=(1, 3)) > 0
  assert set(np.nonzero(dep[4])[0]) == {4, 3, 1}  # itself through the residual h, and its partners at 1, 3
