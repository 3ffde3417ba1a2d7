"""The attention registry: names, build, options and its errors."""

import flax.linen as nn
import pytest

import attention


def test_names_sorted_and_include_softmax():
  names = attention.names()
  assert names == tuple(sorted(names))
  assert "softmax" in names


def test_build_returns_module_with_options():
  layer = attention.build("softmax", num_heads=2, qkv_dim=16, causal=True)
  assert isinstance(layer, nn.Module)
  assert (layer.num_heads, layer.qkv_dim, layer.causal) == (2, 16, True)


def test_unknown_name_lists_valid_choices():
  with pytest.raises(ValueError, match="unknown attention variant 'nope'.*softmax"):
    attention.build("nope")


def test_unknown_option_lists_valid_options():
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['window'\].*num_heads"):
    attention.build("softmax", window=3)


def test_common_options_in_every_variant():
  for name in attention.names():
    options = attention.options(name)
    for common in ("num_heads", "qkv_dim", "causal", "dropout_rate"):
      assert common in options, (name, common)


def test_register_rejects_a_second_class_under_a_taken_name():
  with pytest.raises(ValueError, match="already registered"):
    @attention.register("softmax")
    class Other(attention.AttentionLayer):  # pylint: disable=unused-variable
      pass


def test_register_rejects_non_modules():
  with pytest.raises(TypeError, match="flax.linen.Module"):
    attention.register("not_a_module")(object)


def test_resolve_applies_defaults_then_the_schedule_then_the_user_then_layer_options():
  defaults = {k: v for k, v in attention.options("transnormer").items() if k not in attention.encoder_owned_options()}
  assert attention.resolve("transnormer", 4, {}) == tuple({**defaults, "mode": m} for m in ("diag", "diag", "norm",
                                                                                              "norm"))
  # What the user set wins over the schedule, also when it equals the registry default ("norm").
  assert [o["mode"] for o in attention.resolve("transnormer", 4, {"mode": "norm"})] == ["norm"] * 4
  # Options the schedule does not touch keep the schedule for the rest.
  resolved = attention.resolve("transnormer", 2, {"block_size": 16})
  assert [(o["mode"], o["block_size"]) for o in resolved] == [("diag", 16), ("norm", 16)]
  # Per-layer overrides win over everything for their layer and replace the schedule.
  resolved = attention.resolve("transnormer", 2, {"mode": "norm"}, layer_options=[{"mode": "diag"}, {}])
  assert [o["mode"] for o in resolved] == ["diag", "norm"]
  # A variant without a schedule: the same options in every layer.
  softmax_defaults = {k: v for k, v in attention.options("softmax").items()
                      if k not in attention.encoder_owned_options()}
  assert attention.resolve("softmax", 3, {"implementation": "xla"}) == (
      {**softmax_defaults, "implementation": "xla"},) * 3


def test_resolve_refuses_bad_options_naming_them():
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['window'\].*'softmax'.*implementation"):
    attention.resolve("softmax", 1, {"window": 3})
  with pytest.raises(ValueError, match=r"\['num_heads'\] in the attention config are set by the model"):
    attention.resolve("softmax", 1, {"num_heads": 4})
  with pytest.raises(ValueError, match=r"layer_options has 1 entries; expected one per layer \(2\)"):
    attention.resolve("softmax", 2, {}, layer_options=[{}])
  with pytest.raises(ValueError, match=r"TransNormer \(attention 'transnormer'\): block_size must be >= 1, got "
                     r"block_size=0"):
    attention.resolve("transnormer", 2, {}, layer_options=[{}, {"block_size": 0}])


def test_every_declared_range_is_an_option_and_holds_its_default():
  for name in attention.names():
    defaults = attention.options(name)
    for option, declared in attention.option_ranges(name).items():
      assert isinstance(declared, attention.ranges.Range), (name, option)
      if option in defaults:  # a family-wide table may name options only some subclasses have
        assert declared.contains(defaults[option]), (name, option, defaults[option], declared.describe())


def test_build_refuses_an_out_of_range_option_naming_variant_option_value_and_range():
  with pytest.raises(ValueError, match=r"Performer \(attention 'performer'\): num_features must be >= 1, got "
                     r"num_features=0"):
    attention.build("performer", num_features=0)
  with pytest.raises(ValueError, match=r"unknown kernel 'exp'; valid choices: \('softmax', 'relu'\)"):
    attention.build("performer", kernel="exp")
  with pytest.raises(ValueError, match=r"temperature must be a number > 0.0, got temperature=-1.0"):
    attention.build("sinkhorn", temperature=-1.0)
