"""Attention variants written as `flax.nnx.Module`s (attention/nnx_bridge.py): the README's NNX variant, taken from
the README text, passes the contract suite (and trains through train.py: tests/attention/test_plugins.py); an NNX
variant that decodes passes the decode contract; the NNX constructor's options are registry options like linen
fields."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import attention
from attention import catalog  # the registry proper (attention.registry re-exports its names)
from tests.attention.test_plugins import readme_variants

# An NNX variant that decodes: causal softmax over a key/value cache allocated on the call that finds none.
DECODER = '''
import jax
import jax.numpy as jnp
from flax import nnx

import attention
from kernels.softmax import softmax_attention_reference


@attention.register("nnx_decoder")
class NNXDecoder(nnx.Module):
  supports_decode = True

  def __init__(self, in_features: int, *, num_heads: int = 8, causal: bool = False, decode: bool = False,
               dropout_rate: float = 0.0, dtype="float32", rngs: nnx.Rngs):
    self.num_heads, self.causal, self.decode, self.dropout_rate = num_heads, causal, decode, dropout_rate
    self.query, self.key, self.value, self.out = (
        nnx.Linear(in_features, in_features, dtype=attention.resolve_compute_dtype(dtype), rngs=rngs)
        for _ in range(4))
    self.rngs = rngs

  def __call__(self, x, mask=None, deterministic=True):
    heads = lambda t: t.reshape(*t.shape[:2], self.num_heads, -1)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    if self.decode and hasattr(self, "cached_key"):  # a decode step: write position `index`, attend to 0..index
      index = self.index[...]
      self.cached_key[...] = jax.lax.dynamic_update_slice_in_dim(self.cached_key[...], k, index, axis=1)
      self.cached_value[...] = jax.lax.dynamic_update_slice_in_dim(self.cached_value[...], v, index, axis=1)
      self.index[...] = index + 1
      seen = jnp.arange(self.cached_key.shape[1]) <= index
      y = softmax_attention_reference(q, self.cached_key[...], self.cached_value[...], causal=False,
                                      mask=seen[None, None, None, :])
    else:
      if self.decode:  # the first call (init on the longest input) allocates the cache
        self.cached_key, self.cached_value = nnx.Cache(jnp.zeros_like(k)), nnx.Cache(jnp.zeros_like(v))
        self.index = nnx.Cache(jnp.array(0, jnp.int32))
      y = softmax_attention_reference(q, k, v, causal=self.causal,
                                      mask=None if mask is None else mask[:, None, None, :],
                                      dropout_rate=self.dropout_rate,
                                      dropout_rng=None if deterministic else self.rngs.dropout())
    return self.out(y.reshape(*x.shape[:2], -1))
'''


def test_the_readme_variants_and_an_nnx_decoder_pass_the_contract_suite(nnx_variant):
  """Both README variants (linen and NNX) and the NNX decoder through the contract suite's four tests, in this
  process on the plugins registered here (that ATTENTION_PLUGINS brings a variant into the suite's subprocess and
  collection is tests/attention/test_contract.py::test_a_broken_plugin_variant_fails_by_name; a pytest subprocess
  here cost twice the checks)."""
  del nnx_variant
  from tests.attention import test_contract as suite  # pylint: disable=import-outside-toplevel
  previous = jax.config.read("jax_disable_most_optimizations")  # as the suite's module fixture compiles them
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    for name in ("my_attention", "my_nnx_attention", "nnx_decoder"):
      options = {"num_heads": 2, **suite.OPTIONS.get(name, [{}])[0]}
      for test in (suite.test_shape_padding_jit_and_grad, suite.test_causal, suite.test_decode, suite.test_bfloat16):
        test(name, options)
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture
def nnx_variant(monkeypatch, tmp_path):
  """The README's NNX variant and the decoder registered in this process only (the registry is restored after)."""
  monkeypatch.setattr(catalog, "_REGISTRY", dict(catalog._REGISTRY))  # noqa: SLF001
  monkeypatch.syspath_prepend(str(tmp_path))
  readme_variants(tmp_path)
  (tmp_path / "nnx_decoder_plugin.py").write_text(DECODER)
  for name in ("my_attention", "my_nnx_attention", "nnx_decoder_plugin"):
    monkeypatch.delitem(sys.modules, name, raising=False)
  __import__("nnx_decoder_plugin")
  __import__("my_attention")
  return __import__("my_nnx_attention").MyNNXAttention


def test_nnx_options_are_registry_options(nnx_variant):
  assert isinstance(nnx_variant, type) and issubclass(nnx_variant, nnx.Module)  # register returns the NNX class
  options = attention.options("my_nnx_attention")
  assert options["temperature"] == 1.0 and options["num_heads"] == 8 and "rngs" not in options
  assert set(attention.option_ranges("my_nnx_attention")) == {"temperature"}
  specs = attention.resolve("my_nnx_attention", 2, {"temperature": 3.0})
  assert len(specs) == 2 and all(dict(s)["temperature"] == 3.0 for s in specs)
  with pytest.raises(ValueError, match=r"temperature must be a number > 0.0, got temperature=-1.0"):
    attention.build("my_nnx_attention", temperature=-1.0)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['temprature'\]"):
    attention.build("my_nnx_attention", temprature=2.0)
  # The linen layer runs the NNX module with flat projection names and float32 parameters.
  layer = attention.build("my_nnx_attention", num_heads=2, temperature=2.0, dtype="bfloat16")
  x = jnp.ones((1, 4, 8), jnp.bfloat16)
  variables = layer.init(jax.random.key(0), x)
  assert set(variables["params"]) == {"query", "key", "value", "out"}
  assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  assert layer.apply(variables, x).dtype == jnp.bfloat16


def test_a_common_option_the_nnx_class_does_not_take_is_refused(nnx_variant):
  del nnx_variant
  assert "qkv_dim" in attention.options("nnx_decoder")  # a common option: every variant's build accepts it
  layer = attention.build("nnx_decoder", num_heads=2, qkv_dim=4)
  with pytest.raises(ValueError, match=r"'nnx_decoder' \(NNXDecoder, an nnx.Module\) does not take option qkv_dim; got "
                                       r"qkv_dim=4, which it would ignore"):
    layer.init(jax.random.key(0), jnp.ones((1, 4, 8)))
  assert attention.get_class("nnx_decoder").supports_causal  # it takes `causal`
  assert attention.get_class("my_nnx_attention").supports_decode is False


def test_nnx_registration_errors_name_the_fix(monkeypatch):
  monkeypatch.setattr(catalog, "_REGISTRY", dict(catalog._REGISTRY))  # noqa: SLF001

  class NoWidth(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
      del rngs

  class NoDefault(nnx.Module):
    def __init__(self, in_features, *, scale: float, rngs: nnx.Rngs):
      del in_features, scale, rngs

  class OtherDefault(nnx.Module):
    def __init__(self, in_features, *, num_heads: int = 4, rngs: nnx.Rngs):
      del in_features, num_heads, rngs

  with pytest.raises(TypeError, match=r"must take the input width first"):
    attention.register("nnx_no_width")(NoWidth)
  with pytest.raises(TypeError, match=r"option 'scale' of .*NoDefault.__init__ needs a default value"):
    attention.register("nnx_no_default")(NoDefault)
  with pytest.raises(TypeError, match=r"common option 'num_heads' the default 4; the registry's default is 8"):
    attention.register("nnx_other_default")(OtherDefault)
  assert not any(n.startswith("nnx_") for n in attention.names())
