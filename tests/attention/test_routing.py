"""Routing Transformer (attention/routing.py): clustered attention against the dense token mask of the same
memberships (values and gradients, padding, dropout, causal and not, with local heads); memberships and the online
k-means step against numpy; centroids move only in training; a run resumed from its checkpoint carries the
centroids exactly. Tolerances (float32): 2e-5 absolute (k-means step: 1e-6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import attention
from attention import routing
from tests.attention import contract
from tests.attention.test_nsa import _fast_compiles, compare_to_reference  # noqa: F401  (the module fixture)

TINY = dict(num_heads=4, num_local_heads=1, num_clusters=3, local_window=4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_clustered_form_equals_the_dense_token_mask_reference(causal):
  compare_to_reference("routing", causal=causal, implementations=("xla",), **TINY)


def test_memberships_and_kmeans_step_equal_numpy():
  b, l, h, k, d = 2, 10, 2, 3, 4
  kq, kk, kc = jax.random.split(jax.random.key(0), 3)
  qn = routing.unit(jax.random.normal(kq, (b, l, h, d)))
  kn = routing.unit(jax.random.normal(kk, (b, l, h, d)))
  mu = routing.unit(jax.random.normal(kc, (h, k, d)))
  real = np.arange(l)[None, :] < np.array([[7], [l]])
  members = np.asarray(routing.memberships(qn, mu, jnp.asarray(real), 4))
  q, key, m = np.asarray(qn), np.asarray(kn), np.asarray(mu)
  for bi in range(b):
    for hh in range(h):
      for c in range(k):
        sim = np.where(real[bi], q[bi, :, hh] @ m[hh, c], -np.inf)
        order = np.argsort(-sim, kind="stable")[:4]
        np.testing.assert_array_equal(members[bi, hh, c], np.where(sim[order] == -np.inf, -1, order))
  new = np.asarray(routing.kmeans_update(mu, qn, kn, jnp.asarray(real), 0.9))
  expected = m.copy()
  for hh in range(h):
    pts = np.concatenate([q[:, :, hh][real], key[:, :, hh][real]])
    nearest = np.argmax(pts @ m[hh].T, axis=1)
    for c in range(k):
      if (nearest == c).any():
        v = 0.9 * m[hh, c] + 0.1 * pts[nearest == c].mean(0)
        expected[hh, c] = v / np.linalg.norm(v)
  np.testing.assert_allclose(new, expected, atol=1e-6)
  assert np.abs(new - m).max() > 1e-3


def test_centroids_move_in_training_only():
  layer = attention.build("routing", **TINY)
  x = jax.random.normal(jax.random.key(0), (2, 12, 12))
  variables = jax.jit(layer.init)(contract.RNGS, x)
  before = variables[routing.STATE]["centroids"]
  run = jax.jit(lambda deterministic: layer.apply(variables, x, deterministic=deterministic, mutable=[routing.STATE],
                                                  rngs={"dropout": jax.random.key(1)}), static_argnums=0)
  np.testing.assert_array_equal(run(True)[1][routing.STATE]["centroids"], before)
  assert np.abs(np.asarray(run(False)[1][routing.STATE]["centroids"] - before)).max() > 0
  # No gradient reaches the centroids: they move by the k-means step alone.
  grad = jax.jit(jax.grad(lambda mu: jnp.sum(layer.apply({**variables, routing.STATE: {"centroids": mu}}, x))))(
      before)
  np.testing.assert_array_equal(grad, 0.0)


def test_a_resumed_run_carries_the_centroids_exactly(data_cache, tmp_path):
  """4 steps straight vs the same run resumed from its step-2 checkpoint (a copy of the workdir with the step-4
  checkpoint, the best one and the metrics after step 2 gone): the same centroids and parameters. One run and a resume
  instead of three runs (a 2-step run then extended to 4 saved the same step-2 state)."""
  import shutil  # pylint: disable=import-outside-toplevel

  from lra.training import Experiment, train_and_evaluate  # pylint: disable=import-outside-toplevel
  from lra.training import checkpoints as checkpoints_lib  # pylint: disable=import-outside-toplevel
  from tests.conftest import tiny_listops_config  # pylint: disable=import-outside-toplevel

  config = tiny_listops_config(data_cache, num_steps=4, checkpoint_every_steps=2, eval_every_steps=4,
                               log_every_steps=2, batch_size=4, eval_batch_size=4, keep_checkpoints=2)
  config.train.num_eval_batches = 1
  config.model.attention = ml_collections.ConfigDict({"name": "routing", "num_clusters": 4, "local_window": 8,
                                                      "num_local_heads": 1})

  train_and_evaluate(config, tmp_path / "straight")
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / checkpoints_lib.LATEST_DIR / "4")
  shutil.rmtree(tmp_path / "resumed" / checkpoints_lib.BEST_DIR)
  ckpt = checkpoints_lib.Checkpoints(tmp_path / "resumed")
  try:
    assert ckpt.latest_step() == 2
  finally:
    ckpt.close()
  train_and_evaluate(config, tmp_path / "resumed")

  initial_state = Experiment(config).init_state()  # the restore target, and the centroids before training

  def final(workdir):
    ckpt = checkpoints_lib.Checkpoints(workdir)
    try:
      state, meta = ckpt.restore(initial_state, "latest")
    finally:
      ckpt.close()
    assert meta["step"] == 4
    return jax.device_get((state.params, state.model_state))

  (p1, s1), (p2, s2) = final(tmp_path / "straight"), final(tmp_path / "resumed")
  centroids = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(s1) if "centroids" in str(path)]
  assert centroids, s1
  initial = jax.device_get(initial_state.model_state)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(initial)))  # they moved
  jax.tree.map(np.testing.assert_array_equal, s1, s2)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_decode_and_too_many_clusters_are_refused():
  with pytest.raises(ValueError, match="decode"):
    attention.build("routing", causal=True, decode=True, **TINY).init(contract.RNGS, jnp.ones((1, 8, 12)))
  with pytest.raises(ValueError) as e:
    attention.build("routing", **{**TINY, "num_clusters": 9}).init(contract.RNGS, jnp.ones((1, 8, 12)))
  assert "num_clusters=9" in str(e.value) and "\n" not in str(e.value)
