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
