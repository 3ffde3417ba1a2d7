"""linear, performer, transnormer, based: each variant's own properties, on configurations the contract suite
(`test_contract.py`, one configuration per variant) does not run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention.based import taylor_features
from attention.performer import gaussian_orthogonal_random_matrix
from attention.transnormer import srms_norm
from lra.training import train_and_evaluate
from lra.training.metric_writers import read_metrics
from configs import common
from tests.attention import contract
from tests.conftest import tiny_listops_config

# Sub-kinds the contract suite does not run (it runs each variant's defaults with small sizes, on the default
# implementation): their feature maps, on XLA's form of the kernels (the same feature map in every form).
VARIANTS = [("linear", {"feature_map": "relu", "implementation": "xla"}),
            ("performer", {"kernel": "relu", "num_features": 32, "implementation": "xla"})]
IDS = [f"{n}-{'-'.join(map(str, o.values()))}" for n, o in VARIANTS]


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_sub_kinds_keep_the_layer_contract(name, options):
  contract.check_layer(name, num_heads=2, **options)
  contract.check_causal(name, num_heads=2, **options)
  contract.check_decode(name, num_heads=2, **options)


def test_performer_error_falls_as_features_grow():
  x = jax.random.normal(jax.random.key(100), (2, 16, 32)) * 0.5
  softmax = attention.build("softmax", num_heads=2, implementation="reference")
  params = softmax.init(jax.random.key(1), x)["params"]
  want = softmax.apply({"params": params}, x)
  errors = []
  for m in (8, 64, 512):
    # XLA's form (the estimator is the same in every implementation): one compiled program per feature count.
    performer = attention.build("performer", num_heads=2, num_features=m, implementation="xla")
    run = jax.jit(lambda seed, performer=performer: performer.apply(  # fresh features per seed, same params
        {"params": params, "attention_state": performer.init(jax.random.key(seed), x)["attention_state"]}, x))
    errors.append(np.mean([float(jnp.sqrt(jnp.mean((run(s) - want) ** 2))) for s in range(6)]))
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.35 * errors[0], errors


def test_orthogonal_features_are_orthogonal_within_blocks():
  w = np.asarray(gaussian_orthogonal_random_matrix(jax.random.key(0), 20, 8))
  assert w.shape == (20, 8)
  for start in (0, 8):  # complete blocks of `dim` rows
    gram = w[start:start + 8] @ w[start:start + 8].T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
  # Row norms are chi-distributed like Gaussian rows (mean ~ sqrt(8)), not 1.
  assert 1.5 < np.linalg.norm(w, axis=1).mean() < 4.0


def test_performer_redraws_features_at_the_interval():
  x = jnp.ones((1, 4, 16))
  layer = attention.build("performer", num_heads=2, num_features=8, feature_redraw_interval=2, implementation="xla")
  variables = layer.init(jax.random.key(0), x)
  projections = []
  for step in range(4):
    _, mutated = layer.apply(variables, x, deterministic=False, rngs={"attention": jax.random.key(10 + step)},
                             mutable=["attention_state"])
    variables = {**variables, **mutated}
    projections.append(np.asarray(variables["attention_state"]["projection"]))
  # Calls 0 and 1 keep the init features; call 2 redraws; call 3 keeps them.
  np.testing.assert_array_equal(projections[0], projections[1])
  assert not np.allclose(projections[1], projections[2])
  np.testing.assert_array_equal(projections[2], projections[3])
  # Evaluation never redraws.
  y1 = layer.apply(variables, x)
  np.testing.assert_array_equal(y1, layer.apply(variables, x))


def test_taylor_features_expand_exp():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 6))
  s = float(jnp.sum(q * k) / jnp.sqrt(6.0))
  got = float(jnp.sum(taylor_features(q) * taylor_features(k)))
  np.testing.assert_allclose(got, 1 + s + s * s / 2, rtol=1e-5)


def test_srms_norm_has_unit_rms():
  x = jax.random.normal(jax.random.key(0), (3, 5, 12)) * 7.0
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(srms_norm(x) ** 2, axis=-1)), 1.0, rtol=1e-4)


def test_transnormer_default_schedule_is_diag_then_norm():
  cls = attention.get_class("transnormer")
  assert [o["mode"] for o in cls.default_layer_options(4)] == ["diag", "diag", "norm", "norm"]


def test_unknown_options_name_the_choices():
  x = jnp.ones((1, 4, 16))
  for name, bad in [("linear", {"feature_map": "tanh"}), ("performer", {"kernel": "exp"}),
                    ("transnormer", {"mode": "full"})]:
    with pytest.raises(ValueError, match="valid choices"):
      attention.build(name, num_heads=2, **bad).init(jax.random.key(0), x)


@pytest.mark.parametrize("name", ["linear", "performer", "transnormer", "based"])
def test_listops_training_lowers_the_loss(name, data_cache, tmp_path):
  """Each variant through the trainer (20 steps, one evaluation batch). On XLA's form of the kernels: the default
  dispatch also traces the GPU and TPU kernels of the training step (the contract suite runs the default on every
  variant, tests/kernels compares the forms)."""
  config = tiny_listops_config(data_cache, num_steps=20, learning_rate=0.02, log_every_steps=5,
                               eval_every_steps=1000, checkpoint_every_steps=1000, num_eval_batches=1)
  config.model.attention = common.attention_config(name, implementation="xla")
  train_and_evaluate(config, tmp_path)
  losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
