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


# ---- constraints a single range cannot state (issue 36): declared, checked by the gate, not by the layer ----------

def test_integer_ranges_state_odd_even_and_multiples():
  odd, even, fours = (attention.ranges.Integer(1, odd=True), attention.ranges.Integer(0, multiple_of=2),
                      attention.ranges.Integer(1, multiple_of=4))
  assert [odd.contains(v) for v in (1, 2, 3, 0, 3.0)] == [True, False, True, False, False]
  assert [even.contains(v) for v in (0, 2, 3, -2)] == [True, True, False, False]
  assert (odd.describe(), even.describe(), fours.describe()) == (
      "an odd integer >= 1", "an even integer >= 0", "an integer >= 1 that is a multiple of 4")
  assert odd.requirement("window", 2) == "window must be odd, got window=2"
  assert odd.requirement("window", -1) == "window must be an odd integer >= 1, got window=-1"
  assert fours.requirement("qkv_dim", 6) == "qkv_dim must be a multiple of 4, got qkv_dim=6"


def test_resolve_refuses_a_constraint_between_the_variants_own_options_naming_value_and_fix():
  with pytest.raises(attention.OptionError, match=r"SparseTransformerAttention \(attention 'sparse_transformer'\): c "
                     r"must be in \[1, 2\] with stride=2, pattern='fixed' \(.*use c <= stride\), got c=3") as e:
    attention.resolve("sparse_transformer", 2, {"pattern": "fixed", "stride": 2}, layer_options=[{}, {"c": 3}])
  [problem] = e.value.problems
  assert (problem.where, problem.option, problem.value, problem.kind) == ("layer_options[1]", "c", 3, "constraint")
  attention.resolve("sparse_transformer", 1, {"pattern": "strided", "stride": 2, "c": 3})  # c is the fixed pattern's


@pytest.mark.parametrize("name,options,match", [
    ("local", {"window": 2}, r"LocalAttention \(attention 'local'\): window must be odd with causal=False \(.*use an "
                             r"odd window, or causal=True\), got window=2"),
    ("longformer", {"window": 4, "num_global_blocks": 0}, r"window must be odd with causal=False .*got window=4"),
    ("bigbird", {"window": 2}, r"BigBirdAttention \(attention 'bigbird'\): window must be odd, got window=2"),
])
def test_a_bidirectional_window_must_be_odd_before_any_tracing(name, options, match):
  with pytest.raises(ValueError, match=match):
    attention.build(name, num_heads=2, **options)  # built, not called: nothing traced
  if name != "bigbird":
    attention.build(name, num_heads=2, causal=True, **options)  # a causal window is the block and window - 1 before
  # The masks no longer check it at every trace: the gate did (their *_layout entry points still do for direct use).
  attention.sparse_layouts.local_mask(block_size=1, window=2)


def test_rope_needs_an_even_head_dim_checked_when_the_layer_is_built():
  with pytest.raises(ValueError, match=r"SoftmaxAttention \(attention 'softmax'\): qkv_dim must be a multiple of 4 "
                     r"with num_heads=2, positions='rope' \(.*choose qkv_dim a multiple of 2 \* num_heads\), got "
                     r"qkv_dim=6"):
    attention.build("softmax", num_heads=2, qkv_dim=6, positions="rope")
  attention.build("softmax", num_heads=2, qkv_dim=6, positions="alibi")  # only RoPE rotates pairs
  attention.build("softmax", num_heads=2, qkv_dim=None, positions="rope")  # the input's width: the call's shape check


def test_every_variant_meets_its_constraints_with_its_defaults():
  for name in attention.names():
    [spec] = attention.resolve(name, 1, {})
    for causal in (False, True) if spec.can_be_causal else (False,):
      assert attention.registry.constraint_problems(spec, {"causal": causal, "num_heads": 2, "qkv_dim": 16,
                                                           "positions": "none"}) == [], (name, causal)


def test_config_validation_names_a_broken_constraint_through_the_gate():
  import ml_collections  # pylint: disable=import-outside-toplevel
  from lra.training import config_checks  # pylint: disable=import-outside-toplevel
  model = dict(emb_dim=16, num_layers=2, num_heads=2, qkv_dim=16, mlp_dim=16, pos_encoding="learned")

  def problems(task=None, **changes):
    config = ml_collections.ConfigDict({"model": {**model, **changes}, **({"task": task} if task else {})})
    return config_checks.config_problems(config)

  window = ("is out of range for 'local': expected an odd integer >= 1 with causal=False (a bidirectional window is "
            "the block and (window - 1) / 2 blocks on each side; use an odd window, or causal=True)")
  assert problems(attention={"name": "local", "window": 2}) == [f"config.model.attention.window=2 {window}"]
  assert problems(attention={"name": "local"}, layer_options=[{}, {"window": 4}]) == [
      f"config.model.layer_options[1].window=4 {window}"]
  assert problems("mqar", attention={"name": "local", "window": 2}) == []  # a language model's encoder is causal
  [rope] = problems(attention={"name": "softmax"}, qkv_dim=6, pos_encoding="rope")
  assert rope.startswith("config.model.qkv_dim=6 is out of range for attention 'softmax': expected an integer >= 1 "
                         "that is a multiple of 4 with num_heads=2, positions='rope'")
  [summary] = problems(attention={"name": "sparse_transformer", "pattern": "fixed", "stride": 2, "c": 3})
  assert summary.startswith("config.model.attention.c=3 is out of range for 'sparse_transformer': expected an integer "
                            "in [1, 2] with stride=2, pattern='fixed'")


def test_questions_once_asked_by_the_layer_at_every_call_are_the_gates():
  with pytest.raises(ValueError, match=r"n_buckets must be an even number >= 2 .*got n_buckets=4.0"):
    attention.resolve("reformer", 1, {"n_buckets": 4.0})  # an int count: 4.0 passed the old predicate
  sortcut, = attention.resolve("sinkhorn", 1, {"sortcut_k": 1})
  assert not sortcut.can_be_causal and attention.resolve("sinkhorn", 1, {})[0].can_be_causal
  with pytest.raises(ValueError, match=r"SinkhornAttention cannot be causal \(causal=True was given\): SortCut "
                     r"\(sortcut_k=1\).*use sortcut_k=0 with causal=True"):
    sortcut.build(num_heads=2, causal=True)
  with pytest.raises(attention.OptionError, match=r"NativeSparseAttention \(attention 'nsa'\): compress_block must be "
                     r"a multiple of 3 with compress_stride=3 .*got compress_block=32"):
    attention.resolve("nsa", 1, {"compress_stride": 3})  # once the layer's call re-checked it at every trace
  with pytest.raises(ValueError, match=r"num_kv_heads must be a divisor of 4 with num_heads=4 .*got num_kv_heads=3"):
    attention.build("nsa", num_heads=4, num_kv_heads=3)
