"""The `flex` layer and its mask/score registry (attention/flex.py, attention/flex_mods.py), and grouped-query
attention in `flex` and `softmax`.

Oracles written independently of the code under test: each built-in mask as a numpy grid from its definition, T5's
bucket rule as scalar Python, and a dense einsum attention on the layer's own parameters that takes the grid and an
explicit score bias. float32 throughout: values and gradients within 1e-5 (absolute, relative) of the oracle.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import flex_mods
from attention.flex import FlexAttention
from attention.positions import alibi_slopes
from attention.ranges import Integer

L, B, H, F = 11, 2, 2, 16  # 11 tokens against 4-token tiles: a partial last tile
TOL = dict(atol=1e-5, rtol=1e-5)  # float32


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """Tiny programs: XLA's optimizer costs more than running them."""
  try:
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
  except (AttributeError, KeyError, ValueError):
    yield
    return
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


# ---- the masks and scores against their definitions ----------------------------------------------------------------


def grid(name: str, length: int = L, segments=None, **opt) -> np.ndarray:
  """`[B, L, L]` bool: mask `name` from its definition, loops over (query i, key j)."""
  out = np.zeros((B, length, length), bool)
  for b in range(B):
    for i in range(length):
      for j in range(length):
        out[b, i, j] = {
            "full": lambda: True,
            "causal": lambda: j <= i,
            "sliding_window": lambda: abs(i - j) < opt["window"],
            "dilated": lambda: abs(i - j) < opt["window"] * opt["dilation"] and (i - j) % opt["dilation"] == 0,
            "prefix_lm": lambda: j < opt["prefix_length"] or j <= i,
            "document": lambda: segments[b][i] == segments[b][j],
            "global_window": lambda: abs(i - j) < opt["window"] or i < opt["num_global"] or j < opt["num_global"],
        }[name]()
  return out


SEGMENTS = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3]], np.int32)
MASK_CASES = [("full", {}), ("causal", {}), ("sliding_window", {"window": 3}), ("dilated", {"window": 2, "dilation": 3}),
              ("prefix_lm", {"prefix_length": 4}), ("document", {}), ("global_window", {"window": 2, "num_global": 2})]


def evaluate_mask(mod, length: int = L) -> np.ndarray:
  b = jnp.arange(B)[:, None, None]
  idx = jnp.arange(length)
  return np.asarray(jnp.broadcast_to(mod(b, 0, idx[None, :, None], idx[None, None, :]), (B, length, length)))


@pytest.mark.parametrize("name,opt", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_every_builtin_mask_is_its_definition(name, opt):
  ctx = flex_mods.ModContext(num_heads=H, segment_ids_BxL=jnp.asarray(SEGMENTS))
  got = evaluate_mask(flex_mods.build("mask", name, ctx, **opt))
  np.testing.assert_array_equal(got, grid(name, segments=SEGMENTS, **opt))


def test_combinators_are_intersection_and_union():
  ctx = flex_mods.ModContext(num_heads=H, segment_ids_BxL=jnp.asarray(SEGMENTS),
                             options={"window": 2, "prefix_length": 3})
  window, doc, prefix = grid("sliding_window", window=2), grid("document", segments=SEGMENTS), grid("prefix_lm",
                                                                                                   prefix_length=3)
  both = flex_mods.build("mask", "and_masks", ctx, masks=("sliding_window", "document"))
  either = flex_mods.build("mask", "or_masks", ctx, masks=("document", "prefix_lm"))
  np.testing.assert_array_equal(evaluate_mask(both), window & doc)
  np.testing.assert_array_equal(evaluate_mask(either), doc | prefix)
  assert (window & doc).any() and not (window & doc).all()  # the check can fail


def t5_bucket_scalar(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
  """T5's `_relative_position_bucket` for one relative position (memory - query), in plain Python."""
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    bucket += num_buckets if rel > 0 else 0
    n = abs(rel)
  else:
    n = max(-rel, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return bucket + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  return bucket + min(large, num_buckets - 1)


def test_t5_buckets_are_t5s():
  rel = np.arange(-300, 301)
  for bidirectional in (True, False):
    got = np.asarray(flex_mods.t5_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=32,
                                         max_distance=128))
    want = [t5_bucket_scalar(int(r), bidirectional, 32, 128) for r in rel]
    np.testing.assert_array_equal(got, want)


def test_builtin_scores_are_their_definitions():
  ctx = flex_mods.ModContext(num_heads=4)
  score = jnp.linspace(-80.0, 80.0, 7)[None, None, :, None] * jnp.ones((1, 4, 1, 5))
  b, h, qi, ki = 0, jnp.arange(4)[None, :, None, None], jnp.arange(7)[None, None, :, None], jnp.arange(5)[None, None,
                                                                                                             None, :]
  alibi = flex_mods.build("score", "alibi", ctx)(score, b, h, qi, ki)
  dist = np.abs(np.arange(7)[:, None] - np.arange(5)[None, :])
  np.testing.assert_allclose(alibi, score - alibi_slopes(4)[None, :, None, None] * dist, rtol=1e-6)
  capped = flex_mods.build("score", "softcap", ctx, softcap=20.0)(score, b, h, qi, ki)
  np.testing.assert_allclose(capped, 20.0 * np.tanh(np.asarray(score) / 20.0), rtol=1e-6)
  assert float(jnp.max(jnp.abs(capped))) < 20.0


# ---- the layer against a dense oracle on its own parameters -------------------------------------------------------


def oracle(params, x, allowed_BxLxL, *, num_heads=H, bias_HxLxL=None, softcap=None, key_mask=None):
  """Dense attention with the layer's projections: scores * scale -> softcap -> + bias -> masked softmax (a row with
  no allowed key gives 0)."""
  q = jnp.einsum("blf,fhd->blhd", x, params["query"]["kernel"]) + params["query"]["bias"]
  k = jnp.einsum("blf,fhd->blhd", x, params["key"]["kernel"]) + params["key"]["bias"]
  v = jnp.einsum("blf,fhd->blhd", x, params["value"]["kernel"]) + params["value"]["bias"]
  k, v = (jnp.repeat(t, num_heads // t.shape[2], axis=2) for t in (k, v))
  s = jnp.einsum("blhd,bshd->bhls", q, k) / math.sqrt(q.shape[-1])
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  if bias_HxLxL is not None:
    s = s + bias_HxLxL[None]
  allowed = jnp.asarray(allowed_BxLxL)[:, None]
  if key_mask is not None:
    allowed = allowed & key_mask[:, None, None, :]
  w = jnp.where(allowed, jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1), 0.0)
  y = jnp.einsum("bhls,bshd->blhd", w, v)
  return jnp.einsum("blhd,hdf->blf", y, params["out"]["kernel"]) + params["out"]["bias"]


def _compare(layer, oracle_fn, x, **call):
  params = jax.jit(lambda x: layer.init(jax.random.key(0), x, **call))(x)["params"]
  ours = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x, **call))),
                                    argnums=(0, 1)))
  theirs = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(oracle_fn(p, x))), argnums=(0, 1)))
  (v1, (gp1, gx1)), (v2, (gp2, gx2)) = ours(params, x), theirs(params, x)
  np.testing.assert_allclose(v1, v2, **TOL)
  np.testing.assert_allclose(gx1, gx2, **TOL)
  for a, b in zip(jax.tree.leaves(gp1), jax.tree.leaves(gp2)):
    np.testing.assert_allclose(a, b, **TOL)
  assert jax.tree.structure(gp1) == jax.tree.structure(gp2)
  return params, gp1


X = jax.random.normal(jax.random.key(1), (B, L, F))
PAD = jnp.arange(L)[None, :] < jnp.array([[7], [L]])  # example 0: 4 padded tokens


def test_causal_sliding_window_with_relative_bias_and_gqa():
  layer = attention.build("flex", mask="sliding_window", window=3, causal=True, score="relative_bias", num_buckets=8,
                          max_distance=16, num_kv_heads=1, num_heads=H, block_size=4)
  rel = np.arange(L)[None, :] - np.arange(L)[:, None]  # kv - q
  buckets = np.vectorize(lambda r: t5_bucket_scalar(int(r), False, 8, 16))(rel)
  allowed = grid("sliding_window", window=3) & grid("causal")

  def fn(p, x):
    return oracle(p, x, allowed, bias_HxLxL=jnp.moveaxis(p["relative_bias"][buckets], -1, 0))

  params, grads = _compare(layer, fn, X)
  assert params["key"]["kernel"].shape[1] == 1  # one key/value head
  assert float(jnp.abs(grads["relative_bias"]).sum()) > 0  # the learned bias trains


def test_document_mask_from_padding_with_softcap():
  """Documents derived from the padding mask; padded query rows see no key (0 output, finite gradients). On flex's
  XLA form (the test above runs the default dispatch, which also traces the GPU and TPU kernels)."""
  layer = attention.build("flex", mask="document", score="softcap", softcap=2.0, num_heads=H, block_size=4,
                          implementation="xla")
  segments = np.cumsum(~np.asarray(PAD), axis=1)
  _compare(layer, lambda p, x: oracle(p, x, grid("document", segments=segments), softcap=2.0, key_mask=PAD), X,
           mask=PAD)


def test_prefix_lm_with_alibi_positions():
  layer = attention.build("flex", mask="prefix_lm", prefix_length=4, positions="alibi", num_heads=H, block_size=4,
                          implementation="reference")
  dist = np.abs(np.arange(L)[:, None] - np.arange(L)[None, :])
  bias = -alibi_slopes(H)[:, None, None] * dist
  _compare(layer, lambda p, x: oracle(p, x, grid("prefix_lm", prefix_length=4), bias_HxLxL=bias, key_mask=PAD), X,
           mask=PAD)


def test_a_data_dependent_document_mask_inside_jit():
  """Document ids traced through one compiled program: two different packings, each equal to the oracle."""
  layer = attention.build("flex", mask="document", num_heads=H, block_size=4, implementation="reference")
  params = jax.jit(layer.init)(jax.random.key(0), X)["params"]
  run = jax.jit(lambda p, x, seg: layer.apply({"params": p}, x, segment_ids=seg))
  other = np.array([[0] * 5 + [1] * 6, [2] * 2 + [5] * 9], np.int32)
  for segments in (SEGMENTS, other):
    np.testing.assert_allclose(run(params, X, jnp.asarray(segments)),
                               oracle(params, X, grid("document", segments=segments)), **TOL)


def test_decoding_with_segment_ids_equals_the_parallel_output():
  opts = dict(mask="and_masks", masks=("document", "sliding_window"), window=4, num_heads=H, num_kv_heads=1,
              block_size=4, implementation="reference")
  parallel, decoder = attention.build("flex", causal=True, **opts), attention.build("flex", causal=True, decode=True,
                                                                                   **opts)
  seg = jnp.asarray(SEGMENTS)
  params = jax.jit(parallel.init)(jax.random.key(0), X)["params"]
  expected = jax.jit(lambda p, x, s: parallel.apply({"params": p}, x, segment_ids=s))(params, X, seg)
  cache = jax.jit(lambda p, x, s: decoder.apply({"params": p}, x, segment_ids=s, mutable=["cache"]))(
      params, X, seg)[1]["cache"]
  assert cache["cached_key"].shape == (B, L, 1, F // H)  # the cache holds num_kv_heads heads
  step = jax.jit(lambda c, x, s: decoder.apply({"params": params, "cache": c}, x, segment_ids=s, mutable=["cache"]))
  outs = []
  for t in range(L):
    y, mutated = step(cache, X[:, t:t + 1], seg[:, t:t + 1])
    cache = mutated["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), expected, atol=2e-5, rtol=1e-5)


# ---- grouped-query attention equals repeating the key/value heads --------------------------------------------------


@pytest.mark.parametrize("name", ["flex", "softmax"])
def test_gqa_equals_repeated_key_value_heads(name):
  heads, kv_heads = 4, 2
  extra = {"mask": "sliding_window", "window": 3, "block_size": 4} if name == "flex" else {}
  extra["implementation"] = "reference"  # the layer's grouping; the cores' own GQA is tested with the cores
  gqa = attention.build(name, num_heads=heads, num_kv_heads=kv_heads, causal=True, **extra)
  mha = attention.build(name, num_heads=heads, causal=True, **extra)
  params = jax.jit(gqa.init)(jax.random.key(0), X)["params"]
  repeated = dict(params)
  for proj in ("key", "value"):
    repeated[proj] = {"kernel": jnp.repeat(params[proj]["kernel"], heads // kv_heads, axis=1),
                      "bias": jnp.repeat(params[proj]["bias"], heads // kv_heads, axis=0)}
  f = jax.jit(lambda p, m, x: jnp.sum(jnp.sin(m.apply({"params": p}, x, mask=PAD))), static_argnums=1)
  np.testing.assert_allclose(f(params, gqa, X), f(repeated, mha, X), **TOL)
  gx_gqa = jax.grad(lambda x: f(params, gqa, x))(X)
  gx_mha = jax.grad(lambda x: f(repeated, mha, x))(X)
  np.testing.assert_allclose(gx_gqa, gx_mha, **TOL)
  with pytest.raises(ValueError, match="num_kv_heads must be a divisor of 4 with num_heads=4 .*got num_kv_heads=3"):
    attention.build(name, num_heads=heads, num_kv_heads=3, **extra)  # the gate refuses it before any call


def test_softmax_decode_cache_holds_the_key_value_heads():
  decoder = attention.build("softmax", num_heads=4, num_kv_heads=1, causal=True, decode=True)
  cache = jax.eval_shape(decoder.init, jax.random.key(0), X)["cache"]
  assert cache["cached_key"].shape == (B, L, 1, F // 4) and cache["cached_value"].shape == (B, L, 1, F // 4)


# ---- names, options and errors ---------------------------------------------------------------------------------


def test_names_and_one_line_errors():
  assert {"full", "causal", "sliding_window", "dilated", "prefix_lm", "document", "global_window", "and_masks",
          "or_masks"} <= set(flex_mods.names("mask"))
  assert {"alibi", "softcap", "relative_bias"} <= set(flex_mods.names("score"))
  with pytest.raises(ValueError, match=r"unknown flex mask 'nope'; valid choices: and_masks, causal"):
    flex_mods.get("mask", "nope")
  with pytest.raises(ValueError, match=r"unknown flex score 'nope'.*valid choices.*alibi.*ATTENTION_PLUGINS"):
    flex_mods.get("score", "nope")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['size'\] for flex mask 'sliding_window'; valid "
                                       r"options: window"):
    flex_mods.check_options("mask", "sliding_window", {"size": 3})
  with pytest.raises(ValueError, match=r"flex mask 'dilated': dilation must be >= 1, got dilation=0"):
    flex_mods.build("mask", "dilated", flex_mods.ModContext(num_heads=1), dilation=0)
  with pytest.raises(ValueError, match="unknown flex mask 'nope'"):
    attention.build("flex", mask="nope")
  with pytest.raises(ValueError, match="window must be >= 1, got window=0"):
    attention.build("flex", mask="sliding_window", window=0)
  with pytest.raises(ValueError, match="masks must be a tuple of registered flex mask names"):
    attention.build("flex", mask="and_masks", masks=("sliding_window", "nope"))
  with pytest.raises(ValueError, match="option window=.*differs from mask 'sliding_window'"):
    flex_mods.register_mask("wider", options={"window": (5, Integer(1))})(lambda ctx, window: None)
  assert "wider" not in flex_mods.names("mask")


def test_a_users_mask_with_its_own_option_is_selectable_by_name():
  """What a plugin module does: register a mask with a new option; `flex` then takes it as an option (configs too)."""
  @flex_mods.register_mask("test_stripes", options={"test_period": flex_mods.Option(3, Integer(1))})
  def stripes(ctx, test_period):
    del ctx
    return lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % test_period == 0

  assert "test_stripes" in flex_mods.names("mask") and attention.options("flex")["test_period"] == 3
  from attention.base import registered_name  # pylint: disable=import-outside-toplevel
  assert registered_name(attention.get_class("flex")) == "flex"  # the layer with the new field is still "flex"
  with pytest.raises(ValueError, match="test_period must be >= 1, got test_period=0"):
    attention.build("flex", mask="test_stripes", test_period=0)
  layer = attention.build("flex", mask="test_stripes", test_period=4, num_heads=H, block_size=4,
                          implementation="reference")
  period = (np.arange(L)[:, None] - np.arange(L)[None, :]) % 4 == 0
  _compare(layer, lambda p, x: oracle(p, x, np.broadcast_to(period, (B, L, L))), X)
  from configs import common  # pylint: disable=import-outside-toplevel
  assert common.attention_config("flex", mask="test_stripes", test_period=2).to_dict() == {
      "name": "flex", "mask": "test_stripes", "test_period": 2}


def test_any_config_takes_flex_and_its_function_options_from_the_command_line(monkeypatch):
  """`--config.model.attention.name=flex --config.model.attention.mask=...` and the functions' options, through the
  registry's fields and ranges (no per-variant code in configs)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from configs import common  # pylint: disable=import-outside-toplevel
  from lra.training import config_checks  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[2])

  def parse(*argv):
    values = flags.FlagValues()
    holder = common.DEFINE_config_file("config", flag_values=values, sys_argv=["prog", *argv])
    values(["prog", *argv])
    return holder.value

  config = parse("--config=configs/lra/listops.py:runlocal", "--config.model.attention.name=flex",
                 "--config.model.attention.mask=and_masks", "--config.model.attention.masks=('sliding_window', "
                 "'document')", "--config.model.attention.window=4", "--config.model.attention.score=alibi")
  assert config.model.attention.to_dict() == {"name": "flex", "mask": "and_masks", "masks": ("sliding_window",
                                              "document"), "window": 4, "score": "alibi"}
  layers = config_checks.resolved_layers(config)
  assert {(layer["mask"], tuple(layer["masks"]), layer["window"], layer["score"]) for layer in layers} == {
      ("and_masks", ("sliding_window", "document"), 4, "alibi")}
  with pytest.raises(ValueError, match=r"window=0.*integer >= 1"):  # the one gate, with the mask's declared range
    config_checks.check_config(parse("--config=configs/lra/listops.py:runlocal", "--config.model.attention.name=flex",
                                     "--config.model.attention.window=0"))


def test_rope_decoding_equals_the_parallel_output():
  """RoPE rotates queries and keys at their positions before the cache; a decode row sits at its true position."""
  opts = dict(mask="sliding_window", window=3, positions="rope", num_heads=H, block_size=4, implementation="reference")
  parallel, decoder = attention.build("flex", causal=True, **opts), attention.build("flex", causal=True, decode=True,
                                                                                   **opts)
  params = jax.jit(parallel.init)(jax.random.key(0), X)["params"]
  expected = jax.jit(lambda p, x: parallel.apply({"params": p}, x))(params, X)
  cache = jax.jit(lambda p, x: decoder.apply({"params": p}, x, mutable=["cache"]))(params, X)[1]["cache"]
  step = jax.jit(lambda c, x: decoder.apply({"params": params, "cache": c}, x, mutable=["cache"]))
  outs = []
  for t in range(L):
    y, mutated = step(cache, X[:, t:t + 1])
    cache = mutated["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), expected, atol=2e-5, rtol=1e-5)
