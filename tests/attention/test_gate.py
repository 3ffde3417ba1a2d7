"""The one gate for attention options (issue 36): `attention.resolve` checks once and returns frozen specs; the model
builds from them without checking again; questions a class constant cannot answer are the spec's."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import pytest

import attention
from attention import gate
from lra.models import encoder_from_config
from lra.training import config_checks

MODEL = dict(emb_dim=16, num_layers=2, num_heads=2, qkv_dim=16, mlp_dim=16, dropout_rate=0.0,
             attention_dropout_rate=0.0, pos_encoding="learned", pooling="mean")


def test_specs_are_frozen_hashable_and_equal_to_their_options():
  spec, = attention.resolve("local", 1, {"block_size": 4})
  assert spec == {**{k: v for k, v in attention.options("local").items()
                     if k not in attention.encoder_owned_options()}, "block_size": 4}
  assert spec.name == "local" and spec.cls is attention.get_class("local") and hash(spec) == hash(spec)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.name = "softmax"
  assert spec.record() == {"name": "local", **spec}


def test_the_answer_is_computed_once_and_tells_true_from_one():
  first = attention.resolve("performer", 2, {"num_features": 1})
  assert attention.resolve("performer", 2, {"num_features": 1}) is first  # memoized: one answer shared
  with pytest.raises(ValueError, match=r"num_features must be an integer >= 1, got num_features=True"):
    attention.resolve("performer", 2, {"num_features": True})  # True == 1 in Python, not as an option


def test_the_model_builds_from_the_specs_without_resolving_again(monkeypatch):
  config = ml_collections.ConfigDict({**MODEL, "attention": {"name": "local", "block_size": 4}})
  encoder = encoder_from_config(config, vocab_size=8, max_length=8)
  assert all(isinstance(s, attention.AttentionSpec) for s in encoder.attention)
  assert encoder.attention == config_checks.resolved_layers(  # the same answer as the config check's
      ml_collections.ConfigDict({"model": {**MODEL, "attention": {"name": "local", "block_size": 4}}}))
  calls = []
  monkeypatch.setattr(gate, "_resolve", lambda *a: calls.append(a))  # any resolution would now fail loudly
  tokens = jnp.zeros((1, 8), jnp.int32)
  variables = jax.eval_shape(encoder.init, jax.random.key(0), tokens)  # tracing builds every layer
  jax.eval_shape(encoder.apply, variables, tokens)
  assert calls == []


def test_longformer_causality_is_a_question_of_its_options():
  with_globals, = attention.resolve("longformer", 1, {})
  without, = attention.resolve("longformer", 1, {"num_global_blocks": 0})
  assert not with_globals.can_be_causal and without.can_be_causal
  with pytest.raises(ValueError, match="cannot be causal .causal=True was given.: global tokens"):
    with_globals.build(causal=True, num_heads=2)
  layer = without.build(causal=True, num_heads=2)
  layer.init(jax.random.key(0), jnp.ones((1, 8, 16)))


def test_multiplicative_positions_depend_on_its_form():
  dot, = attention.resolve("multiplicative", 1, {"form": "dot"})
  general, = attention.resolve("multiplicative", 1, {"form": "general"})
  assert "rope" in dot.supported_positions and "rope" not in general.supported_positions


def test_model_owned_options_are_checked_when_the_layer_is_built():
  spec, = attention.resolve("softmax", 1, {})
  with pytest.raises(ValueError, match=r"dropout_rate must be a number in \[0.0, 1.0\), got dropout_rate=1.5"):
    spec.build(num_heads=2, dropout_rate=1.5)
  with pytest.raises(ValueError, match=r"decode=True requires causal=True"):
    spec.build(num_heads=2, decode=True)
  with pytest.raises(ValueError, match=r"\['window'\] are not model-owned options"):
    spec.build(window=3)


def test_the_config_check_formats_the_gates_problems():
  config = ml_collections.ConfigDict({"model": {**MODEL, "attention": {"name": "local", "block_size": 0,
                                                                       "window": "x", "causal": True,
                                                                       "nope": 1}}})
  assert config_checks.config_problems(config) == [
      "config.model.attention.block_size=0 is out of range for 'local': expected an integer >= 1",
      "config.model.attention.causal=True: set by the encoder from config.model; remove it from "
      "config.model.attention",
      "config.model.attention.nope: unknown option for attention 'local'; valid options: block_size, "
      "implementation, window",
      "config.model.attention.window='x' is out of range for 'local': expected an integer >= 1"]


@pytest.mark.parametrize("name,options,match", [
    ("longformer", dict(num_heads=2, dilation=2, num_dilated_heads=3),
     r"num_dilated_heads must be in \[0, 2\] with num_heads=2, dilation=2 .*got num_dilated_heads=3"),
    ("softmax", dict(num_heads=4, num_kv_heads=3), r"num_kv_heads must be a divisor of 4 with num_heads=4 .*got "
                                                   r"num_kv_heads=3"),
    ("flex", dict(num_heads=4, num_kv_heads=3), r"num_kv_heads must be a divisor of 4 .*got num_kv_heads=3"),
    ("nsa", dict(num_heads=4, num_kv_heads=3), r"num_kv_heads must be a divisor of 4 with num_heads=4 .*got "
                                               r"num_kv_heads=3"),  # the same shared constraint as flex's
    ("routing", dict(num_heads=2, num_local_heads=3),
     r"num_local_heads must be in \[0, 2\] with num_heads=2 .*got num_local_heads=3"),
])
def test_head_counts_are_gate_constraints_also_for_a_layer_constructed_directly(name, options, match):
  """Issue 36: `num_dilated_heads <= num_heads` (Longformer) and `num_kv_heads` dividing `num_heads` (softmax, flex)
  are constraints the gate checks before any tracing (no longer at a call), with one line naming value, expectation
  and fix; a registered class constructed directly raises the same line at construction (`__post_init__`)."""
  with pytest.raises(ValueError, match=match) as built:
    attention.build(name, **options)
  assert "\n" not in str(built.value)
  with pytest.raises(ValueError) as constructed:
    attention.get_class(name)(**options)
  assert str(constructed.value) == str(built.value)
  own = {k: v for k, v in options.items() if k != "num_heads"}
  config = ml_collections.ConfigDict({"model": {**MODEL, "num_heads": options["num_heads"],
                                                "attention": {"name": name, **own}}})
  key = next(k for k in options if k.startswith("num_") and k != "num_heads")
  assert [p.split(" is out of range")[0] for p in config_checks.config_problems(config)] == [
      f"config.model.attention.{key}={options[key]}"]


def test_a_constructed_layer_is_checked_once_and_a_gate_built_one_not_again(monkeypatch):
  """The construction check runs once per distinct options (Flax clones the module at `init` / `apply` / `bind`:
  cloned here, without tracing), and not at all for a layer `attention.build` made (the gate checked it just
  before)."""
  from attention import base  # pylint: disable=import-outside-toplevel
  calls = []
  installed = base._CONSTRUCTION_GATE[0]  # pylint: disable=protected-access
  monkeypatch.setattr(base, "_CONSTRUCTION_GATE", [lambda cls, options: calls.append(cls) or installed(cls, options)])
  direct = attention.get_class("softmax")(num_heads=2, num_kv_heads=1, dropout_rate=0.0361)  # options new here
  direct.clone(), direct.clone(name="attention"), direct.bind({"params": {}})
  assert len(calls) == 1
  built = attention.build("softmax", num_heads=2, num_kv_heads=2, dropout_rate=0.0362)
  built.clone(), built.bind({"params": {}})
  assert len(calls) == 1


def test_flex_functions_are_checked_by_the_gate_once_and_never_at_a_call(monkeypatch):
  """Issue 36: the flex layer's mask / score names and their options, a plugin's function included, are checked by
  the gate alone; the layer's calls (init, then two applies) run no range check and no flex_mods check."""
  from attention import flex as flex_layer, flex_mods, ranges  # pylint: disable=import-outside-toplevel

  # What a module named in ATTENTION_PLUGINS does (reusing the built-in `window` option: the flex class keeps its
  # fields, so the registry other tests see is unchanged but for the name). Data-dependent: the layer builds it
  # anew at every call (a static mask's function is cached per options), so a call-time check could not hide.
  @flex_mods.register_mask("gate_probe_band", options={"window": flex_mods.WINDOW}, data_dependent=True)
  def band(ctx, window):
    del ctx
    return lambda b, h, q_idx, kv_idx: jnp.abs(q_idx - kv_idx) < window

  with pytest.raises(ValueError, match=r"^FlexAttention \(attention 'flex'\): window must be >= 1, got window=0$"):
    attention.build("flex", mask="gate_probe_band", window=0)  # the plugin's option range, at the gate
  layer = attention.build("flex", mask="gate_probe_band", window=2, score="softcap", softcap=5.0, num_heads=1)
  checks, cores = [], []

  def fail(what):
    def check(*args, **kwargs):
      checks.append(what)
      raise AssertionError(f"{what} checked again at a call")
    return check

  for cls in (r for r in vars(ranges).values() if isinstance(r, type) and issubclass(r, ranges.Range)):
    monkeypatch.setattr(cls, "contains", fail(f"{cls.__name__}.contains"))
  monkeypatch.setattr(ranges.Constraint, "violated", fail("Constraint.violated"))
  monkeypatch.setattr(flex_mods, "check_options", fail("flex_mods.check_options"))
  monkeypatch.setattr(flex_mods, "build", fail("flex_mods.build"))

  def core(q, k, v, *, mask_mod, score_mod, **kwargs):  # the functions the layer built, evaluated; no kernel traced
    i = jnp.arange(q.shape[1])
    cores.append((mask_mod(0, 0, i[:, None], i[None, :]), score_mod(jnp.ones(()), 0, 0, i[:, None], i[None, :])))
    return q
  monkeypatch.setattr(flex_layer, "flex_attention", core)
  variables = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, 8, 4)))
  for _ in range(2):  # two calls, each traced anew
    jax.eval_shape(lambda v, x: layer.apply(v, x), variables, jnp.ones((1, 8, 4)))
  assert checks == [] and len(cores) == 3 and cores[-1][0].shape == (8, 8)
