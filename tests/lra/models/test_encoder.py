"""The generic encoder: shapes for each pooling, padding invariance, remat equivalence, option errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lra.models import Encoder, SequenceClassifier, sinusoidal_table

SMALL = dict(vocab_size=20, max_length=16, emb_dim=32, num_layers=2, num_heads=4, qkv_dim=32, mlp_dim=64,
             dropout_rate=0.0, attention_dropout_rate=0.0)


def _inputs(batch=3, length=10):
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 1, 20)
  mask = jnp.arange(length)[None, :] < jnp.array([[6], [10], [1]])
  return tokens, mask


# Each pooling and each encoding once: the two are independent stages (embedding, then pooling), so their 3 x 3
# product checked nothing more.
@pytest.mark.parametrize("pooling,shape,pos_encoding", [("cls", (3, 32), "learned"), ("mean", (3, 32), "sinusoidal"),
                                                        ("none", (3, 10, 32), "none")])
def test_shapes(pooling, shape, pos_encoding):
  model = Encoder(**SMALL, pooling=pooling, pos_encoding=pos_encoding)
  tokens, mask = _inputs()
  variables = model.init(jax.random.key(1), tokens, mask)
  assert model.apply(variables, tokens, mask).shape == shape
  assert ("cls" in variables["params"]) == (pooling == "cls")
  assert ("pos_embedding" in variables["params"].get("pos_encoding", {})) == (pos_encoding == "learned")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooled_output_ignores_padded_tokens(pooling):
  model = Encoder(**SMALL, pooling=pooling)
  tokens, mask = _inputs()
  variables = model.init(jax.random.key(1), tokens, mask)
  other = jnp.where(mask, tokens, (tokens * 7 + 3) % 20)  # change only padded positions
  assert not np.array_equal(tokens, other)
  np.testing.assert_allclose(model.apply(variables, tokens, mask), model.apply(variables, other, mask), atol=1e-6)


def test_remat_gives_same_values_and_gradients():
  tokens, mask = _inputs()
  plain, remat = Encoder(**SMALL), Encoder(**SMALL, remat=True)
  variables = plain.init(jax.random.key(1), tokens, mask)

  def loss(model):
    return lambda p: jnp.sum(model.apply({"params": p}, tokens, mask, train=True) ** 2)

  # Jitted: compiling each gradient once is cheaper than running it op by op.
  v1, g1 = jax.jit(jax.value_and_grad(loss(plain)))(variables["params"])
  v2, g2 = jax.jit(jax.value_and_grad(loss(remat)))(variables["params"])
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_attention_parameters_live_under_the_same_path():
  model = Encoder(**SMALL)
  tokens, mask = _inputs()
  params = model.init(jax.random.key(1), tokens, mask)["params"]
  assert set(params["block_0"]["attention"]) == {"query", "key", "value", "out"}


def test_dropout_only_in_training():
  model = Encoder(**{**SMALL, "dropout_rate": 0.3})
  tokens, mask = _inputs()
  variables = model.init(jax.random.key(1), tokens, mask)
  a = model.apply(variables, tokens, mask, train=False)
  b = model.apply(variables, tokens, mask, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)


def test_causal_decode_matches_parallel():
  model = Encoder(**SMALL, pooling="none", causal=True)
  tokens, _ = _inputs(batch=2, length=7)
  variables = model.init(jax.random.key(1), tokens)
  expected = model.apply(variables, tokens)
  decoder = Encoder(**SMALL, pooling="none", causal=True, decode=True)
  cache = decoder.init(jax.random.key(1), tokens)["cache"]
  step = jax.jit(lambda v, token: decoder.apply(v, token, mutable=["cache"]))  # one program for every position
  steps = []
  for t in range(tokens.shape[1]):
    y, mutated = step({"params": variables["params"], "cache": cache}, tokens[:, t:t + 1])
    cache = mutated["cache"]
    steps.append(y)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, atol=1e-5)


def test_errors_name_the_bad_value():
  tokens, mask = _inputs()
  with pytest.raises(ValueError, match="unknown pooling 'max'"):
    Encoder(**SMALL, pooling="max").init(jax.random.key(0), tokens, mask)
  with pytest.raises(ValueError, match="unknown positional encoding 'spiral'"):
    Encoder(**SMALL, pos_encoding="spiral").init(jax.random.key(0), tokens, mask)
  with pytest.raises(ValueError, match="sequence length 10 exceeds .*max_length=8"):
    Encoder(**{**SMALL, "max_length": 8}).init(jax.random.key(0), tokens, mask)
  with pytest.raises(ValueError, match="pooling='cls'.*causal"):
    Encoder(**SMALL, causal=True).init(jax.random.key(0), tokens, mask)
  with pytest.raises(ValueError, match="unknown attention variant"):
    Encoder(**SMALL, attention={"name": "nope"}).init(jax.random.key(0), tokens, mask)


def test_sinusoidal_table_values():
  table = sinusoidal_table(50, 8)
  assert table.shape == (50, 8)
  # Vaswani's interleaved layout: sin in even columns, cos in odd ones (the formula itself:
  # tests/lra/models/test_embeddings.py).
  np.testing.assert_allclose(table[0, 0::2], 0.0)
  np.testing.assert_allclose(table[0, 1::2], 1.0)
  np.testing.assert_allclose(table[:, 0::2] ** 2 + table[:, 1::2] ** 2, 1.0, rtol=1e-6)


def test_classifier_shape():
  model = SequenceClassifier(encoder=Encoder(**SMALL), num_classes=10, head_mlp_dim=16)
  tokens, mask = _inputs()
  batch = {"inputs": tokens, "mask": mask}
  variables = model.init(jax.random.key(0), batch)
  assert model.apply(variables, batch).shape == (3, 10)


def test_bfloat16_encoder_keeps_float32_params_and_logits_and_follows_float32():
  tokens, mask = _inputs()
  batch = {"inputs": tokens, "mask": mask}
  f32 = SequenceClassifier(encoder=Encoder(**SMALL), num_classes=5, head_mlp_dim=16)
  bf16 = SequenceClassifier(encoder=Encoder(**SMALL, dtype="bfloat16"), num_classes=5, head_mlp_dim=16)
  variables = f32.init(jax.random.key(0), batch)
  # The same parameter tree, all float32, serves both precisions.
  assert jax.tree.structure(bf16.init(jax.random.key(0), batch)) == jax.tree.structure(variables)
  assert {p.dtype for p in jax.tree.leaves(bf16.init(jax.random.key(0), batch))} == {jnp.dtype(jnp.float32)}
  pooled = Encoder(**SMALL, dtype="bfloat16").apply({"params": variables["params"]["encoder"]}, tokens, mask)
  assert pooled.dtype == jnp.bfloat16
  want, got = f32.apply(variables, batch), bf16.apply(variables, batch)
  assert got.dtype == jnp.float32  # losses accumulate in float32
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, atol=0.15, rtol=0.1)
  assert not np.array_equal(got, want)  # it did compute in bfloat16


def test_encoder_from_config_reads_and_resolves_the_dtype():
  import ml_collections  # pylint: disable=import-outside-toplevel
  from lra.models import encoder_from_config  # pylint: disable=import-outside-toplevel
  from lra.models import resolve_dtype  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(dict(emb_dim=16, num_layers=1, num_heads=2, qkv_dim=16, mlp_dim=32,
                                          dropout_rate=0.0, attention_dropout_rate=0.0, pos_encoding="learned",
                                          pooling="cls", attention={"name": "softmax"}))
  assert encoder_from_config(config, vocab_size=8, max_length=8).compute_dtype == jnp.float32  # default
  config.dtype = "bfloat16"
  assert encoder_from_config(config, vocab_size=8, max_length=8).compute_dtype == jnp.bfloat16
  config.dtype = "auto"
  expected = jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  assert encoder_from_config(config, vocab_size=8, max_length=8).compute_dtype == expected
  assert resolve_dtype(jnp.bfloat16) == jnp.bfloat16
  with pytest.raises(ValueError,
                     match="unknown compute dtype .fp8..*float32, bfloat16, float16, auto.*config.model.dtype"):
    resolve_dtype("fp8")


def test_attention_config_cannot_override_what_the_encoder_sets():
  tokens, mask = _inputs()
  with pytest.raises(ValueError, match="causal=True is set by the model"):
    Encoder(**SMALL, attention={"name": "softmax", "causal": True}).init(jax.random.key(0), tokens, mask)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['window'\]"):
    Encoder(**SMALL, attention={"name": "softmax", "window": 3}).init(jax.random.key(0), tokens, mask)
  # A config filled with the registry defaults (configs.common.attention_config) repeats them harmlessly.
  Encoder(**SMALL, attention={"name": "softmax", "dtype": "float32"}, dtype="bfloat16").init(
      jax.random.key(0), tokens, mask)


def test_an_option_set_to_its_default_wins_over_the_variants_layer_schedule():
  """TransNormer's schedule is DiagAttention in the lower half; `mode="norm"` set by the user (the registry default)
  means NormAttention in every layer, and `layer_options` still win for their layers."""
  kwargs = {**SMALL, "num_layers": 4}
  modes = lambda **kw: [dict(a)["mode"] for a in Encoder(**kwargs, **kw).attention_for_layers()]  # noqa: E731
  assert modes(attention={"name": "transnormer"}) == ["diag", "diag", "norm", "norm"]
  assert modes(attention={"name": "transnormer", "mode": "norm"}) == ["norm"] * 4
  assert modes(attention={"name": "transnormer", "mode": "norm"},
               layer_options=({"mode": "diag"}, {}, {}, {})) == ["diag", "norm", "norm", "norm"]
