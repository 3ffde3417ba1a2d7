"""reformer, linformer, synthesizer, sinkhorn: layer contracts and each variant's own properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention.reformer import hash_vectors, lsh_attention, shared_qk_attention_reference
from kernels.sinkhorn import sinkhorn_normalize
from configs import common
from lra.training import train_and_evaluate
from lra.training.metric_writers import read_metrics
from tests.attention import contract
from tests.conftest import tiny_listops_config

# Small blocks and chunks, so that the contract lengths (11 and 10) are not multiples of them.
# Each contract check compiles a gradient, so the grid is kept to one or two configurations per variant.
# The contract suite (`test_contract.py`) runs each variant's defaults with small sizes; these are other code paths.
VARIANTS = [
    ("linformer", {"k": 8, "max_length": 16, "sharing": "kv"}),
    ("synthesizer", {"mode": "random", "mix_dot_product": True}),
    ("sinkhorn", {"block_size": 3, "sortcut_k": 2}),
]
IDS = [f"{n}-{'-'.join(map(str, o.values())) or 'default'}" for n, o in VARIANTS]


class _Jitted:
  """A built layer with jitted `init` and `apply`: op-by-op (eager) execution of these layers is slow."""

  def __init__(self, layer):
    self.init = jax.jit(layer.init)
    self.apply = jax.jit(layer.apply, static_argnames="deterministic")


@functools.lru_cache(maxsize=None)
def _jitted_layer(name, options):
  """One jitted layer per configuration, so successive contract checks reuse its compiled functions."""
  return _Jitted(attention.build(name, **dict(options)))


def _init_layer(name, x, **options):
  """`contract.init_layer`, jitted."""
  layer = _jitted_layer(name, tuple(sorted(options.items())))
  return layer, layer.init({"params": jax.random.key(0), "attention": jax.random.key(1)}, x)


@pytest.fixture
def jit_contract(monkeypatch):
  monkeypatch.setattr(contract, "init_layer", _init_layer)
  return contract


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_layer_contract(name, options, jit_contract):
  jit_contract.check_shape(name, num_heads=2, length=11, **options)
  jit_contract.check_padding_by_gradient(name, num_heads=2, length=11, num_real=7, **options)
  if attention.get_class(name).supports_causal and not options.get("sortcut_k"):
    jit_contract.check_causal_by_gradient(name, num_heads=2, length=10, **options)


@pytest.mark.parametrize("name,options", [("sinkhorn", {"sortcut_k": 1})])
def test_non_causal_variants_raise_and_say_why(name, options):
  with pytest.raises(ValueError, match="cannot be causal"):
    attention.build(name, causal=True, num_heads=2, **options).init(jax.random.key(0), jnp.ones((1, 8, 16)))


def test_attention_config_holds_every_option_with_a_default():
  for name in ("reformer", "linformer", "synthesizer", "sinkhorn"):
    config = common.attention_config(name)
    options = {k: v for k, v in config.items() if k != "name"}
    assert all(v is not None for v in options.values()), options
    attention.build(config.name, num_heads=2, **options)  # validates the option names


# ---- Reformer -------------------------------------------------------------------------------------------------


def _lsh_errors(n_hashes, *, length=32, chunk_len=16, n_buckets=4, causal=False, num_draws=8):
  """RMS error of LSH attention against exact shared-QK attention, per draw of inputs and rotations.

  Draws are independent heads (rotations are per head); numpy draws them, which keeps the compiled graph small.
  """
  rng = np.random.default_rng(n_hashes)
  q = jnp.asarray(rng.normal(size=(2, length, num_draws, 8)) * 1.5, jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, length, num_draws, 8)), jnp.float32)
  rotations = jnp.asarray(rng.normal(size=(num_draws, 8, n_hashes, n_buckets // 2)), jnp.float32)

  @jax.jit
  def errors(q, v, rotations):
    got = lsh_attention(q, v, hash_vectors(q, rotations), n_buckets=n_buckets, chunk_len=chunk_len, causal=causal)
    return jnp.sqrt(jnp.mean((got - shared_qk_attention_reference(q, v, causal=causal)) ** 2, axis=(0, 1, 3)))

  return errors(q, v, rotations)


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_error_falls_as_hashes_grow(causal):
  errors = [float(_lsh_errors(n_hashes=r, causal=causal).mean()) for r in (1, 8)]
  assert errors[1] < 0.3 * errors[0], errors


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_equals_exact_shared_qk_attention_when_rounds_cover_every_pair(causal):
  # One chunk holds the whole sequence and 2 buckets with 32 rounds put every pair in a common bucket at least once:
  # the union over rounds, without double counting, is then exact attention.
  errors = _lsh_errors(n_hashes=32, length=16, chunk_len=16, n_buckets=2, causal=causal)
  assert float(errors.max()) < 1e-4, errors


def test_lsh_attends_to_self_only_when_nothing_else_is_allowed():
  q = jax.random.normal(jax.random.key(0), (1, 8, 1, 4))
  v = jax.random.normal(jax.random.key(1), (1, 8, 1, 4))
  buckets = hash_vectors(q, jax.random.normal(jax.random.key(2), (1, 4, 2, 2)))
  attend = jax.jit(lsh_attention, static_argnames=("n_buckets", "chunk_len", "causal"))
  y = attend(q, v, buckets, n_buckets=4, chunk_len=4, causal=True)
  np.testing.assert_allclose(y[0, 0], v[0, 0], atol=1e-6)  # position 0 has nothing earlier
  # Every position in its own bucket: each attends to itself alone.
  alone = jnp.arange(8)[None, None, None, :] * jnp.ones((1, 1, 2, 1), int)
  np.testing.assert_allclose(attend(q, v, alone, n_buckets=8, chunk_len=4), v, atol=1e-6)


def test_reformer_real_outputs_ignore_padded_content_exactly():
  # Hashing and sorting are discrete, so gradients alone cannot show that padding never moves real positions.
  x = jax.random.normal(jax.random.key(0), (2, 11, 16))
  mask = jnp.arange(11)[None, :] < jnp.array([[7], [11]])
  layer, variables = _init_layer("reformer", x, num_heads=2, chunk_len=4, n_buckets=2)
  other = jnp.where(mask[..., None], x, 10.0 * jax.random.normal(jax.random.key(1), x.shape))
  run = lambda x: layer.apply(variables, x, mask=mask, rngs={"attention": jax.random.key(6)})  # noqa: E731
  np.testing.assert_array_equal(run(x)[0, :7], run(other)[0, :7])


def test_reformer_rotations_come_from_the_attention_stream():
  x = jax.random.normal(jax.random.key(0), (1, 24, 16))
  layer = _Jitted(attention.build("reformer", num_heads=2, chunk_len=4, n_buckets=4))
  variables = layer.init({"params": jax.random.key(0)}, x)
  with_key = lambda seed: layer.apply(variables, x, rngs={"attention": jax.random.key(seed)})  # noqa: E731
  np.testing.assert_array_equal(with_key(1), with_key(1))
  assert not np.allclose(with_key(1), with_key(2))
  # Without an `attention` rng: the fixed fallback key, still deterministic.
  np.testing.assert_array_equal(layer.apply(variables, x), layer.apply(variables, x))


def test_reformer_rejects_odd_bucket_counts():
  with pytest.raises(ValueError, match="n_buckets must be an even number"):
    attention.build("reformer", num_heads=2, n_buckets=3).init(jax.random.key(0), jnp.ones((1, 8, 16)))


# ---- Linformer / Synthesizer: length-dependent parameters -----------------------------------------------------


@pytest.mark.parametrize("sharing,names,shape", [
    ("none", {"E", "F"}, (2, 16, 4)), ("headwise", {"E", "F"}, (16, 4)),
    ("kv", {"E"}, (16, 4)), ("layerwise", {"E"}, (16, 4))])
def test_linformer_sharing_modes(sharing, names, shape):
  layer = attention.build("linformer", num_heads=2, k=4, sharing=sharing)
  params = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, 16, 8)))["params"]
  projections = {k: v.shape for k, v in params.items() if k in ("E", "F")}
  assert projections == {name: shape for name in names}


@pytest.mark.parametrize("name,options", [("linformer", {"k": 4}), ("synthesizer", {}),
                                          ("synthesizer", {"mode": "factorized", "factor_k": 2}),
                                          ("sinkhorn", {"block_size": 4})])
def test_fixed_max_length_from_init_serves_shorter_inputs_and_rejects_longer(name, options):
  layer = _Jitted(attention.build(name, num_heads=2, **options))
  variables = layer.init(jax.random.key(0), jnp.ones((1, 16, 8)))  # max_length 0: taken from this input
  assert layer.apply(variables, jnp.ones((2, 9, 8))).shape == (2, 9, 8)
  with pytest.raises(ValueError, match="exceeds max_"):
    layer.apply(variables, jnp.ones((1, 17, 8)))


def test_linformer_shorter_input_equals_padded_input():
  x = jax.random.normal(jax.random.key(0), (1, 16, 8))
  layer = _Jitted(attention.build("linformer", num_heads=2, k=4, max_length=16))
  variables = layer.init(jax.random.key(1), x)
  short = layer.apply(variables, x[:, :9])
  padded = layer.apply(variables, x, mask=jnp.arange(16)[None] < 9)[:, :9]
  np.testing.assert_allclose(short, padded, atol=1e-5)


def test_synthesizer_fixed_random_logits_are_not_parameters():
  x = jnp.ones((1, 6, 8))
  shapes = lambda **o: jax.eval_shape(attention.build("synthesizer", num_heads=2, **o).init,  # noqa: E731
                                      jax.random.key(0), x)
  learned, fixed = shapes(mode="random"), shapes(mode="random", trainable_random=False)
  assert learned["params"]["random"].shape == (2, 6, 6)
  assert "random" not in fixed["params"] and fixed["attention_state"]["random"].shape == (2, 6, 6)


def test_synthesizer_dense_mixing_starts_at_one_half():
  variables = _Jitted(attention.build("synthesizer", num_heads=2, mix_dot_product=True)).init(
      jax.random.key(0), jnp.ones((1, 6, 8)))
  np.testing.assert_allclose(jax.nn.softmax(variables["params"]["mix_logits"]), [0.5, 0.5])


def test_unknown_options_name_the_choices():
  x = jnp.ones((1, 4, 16))
  for name, bad in [("linformer", {"sharing": "all"}), ("synthesizer", {"mode": "conv"})]:
    with pytest.raises(ValueError, match="valid choices"):
      attention.build(name, num_heads=2, **bad).init(jax.random.key(0), x)


# ---- Sinkhorn -------------------------------------------------------------------------------------------------


def test_sinkhorn_iterations_give_a_doubly_stochastic_matrix():
  log_alpha = 2.0 * jax.random.normal(jax.random.key(0), (3, 6, 6))
  sinkhorn = jax.jit(sinkhorn_normalize, static_argnums=1)
  s = sinkhorn(log_alpha, 50)
  np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-4)
  np.testing.assert_allclose(s.sum(-2), 1.0, atol=1e-4)
  assert np.abs(np.asarray(sinkhorn(log_alpha, 1).sum(-2)) - 1.0).max() > 1e-2  # it does take iterations
  # A masked block (a padded one) is excluded; the rest is doubly stochastic.
  keep = jnp.arange(6) < 4
  s = sinkhorn(log_alpha, 50, mask=keep[:, None] & keep[None, :])
  np.testing.assert_array_equal(s[:, 4:], 0.0)
  np.testing.assert_array_equal(s[:, :, 4:], 0.0)
  np.testing.assert_allclose(s[:, :4, :4].sum(-2), 1.0, atol=1e-4)


def test_causal_sinkhorn_rows_depend_only_on_earlier_rows():
  n = 5
  past = jnp.arange(n)[:, None] > jnp.arange(n)[None, :]
  log_alpha = jax.random.normal(jax.random.key(0), (n, n))
  jac = jax.jit(jax.jacrev(lambda a: sinkhorn_normalize(a, 4, mask=past, causal=True)))(log_alpha)  # [n, n, n, n]
  dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [row out, row in]
  np.testing.assert_array_equal(dep[np.triu_indices(n, k=1)], 0.0)
  np.testing.assert_allclose(sinkhorn_normalize(log_alpha, 4, mask=past, causal=True).sum(-1)[1:], 1.0, atol=1e-5)


def test_sinkhorn_gumbel_noise_only_in_training():
  x = jax.random.normal(jax.random.key(0), (1, 16, 8))
  layer = _Jitted(attention.build("sinkhorn", num_heads=2, block_size=4, gumbel_noise=True))
  variables = layer.init(jax.random.key(0), x)
  run = lambda seed, train: layer.apply(variables, x, deterministic=not train,  # noqa: E731
                                        rngs={"attention": jax.random.key(seed)})
  assert not np.allclose(run(1, train=True), run(2, train=True))
  np.testing.assert_array_equal(run(1, train=False), run(2, train=False))


# ---- Training -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,overrides", [
    ("reformer", {"chunk_len": 16}), ("linformer", {}), ("synthesizer", {}), ("sinkhorn", {"block_size": 16})])
def test_listops_training_lowers_the_loss(name, overrides, data_cache, tmp_path):
  config = tiny_listops_config(data_cache, num_steps=20, learning_rate=0.02, log_every_steps=5,
                               eval_every_steps=1000, checkpoint_every_steps=1000, num_eval_batches=1)
  config.model.attention = common.attention_config(name, **overrides)
  train_and_evaluate(config, tmp_path)
  losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
