"""Native Sparse Attention (attention/nsa.py) and the gathered cores it shares (attention/adaptive_sparse.py).

The gathered XLA form against the dense reference that builds the same selection as a token mask (values and
gradients, padding, attention dropout on, causal and bidirectional, GQA); the top-n block lists against a numpy
oracle (ties to the lower block); decoding against the parallel causal output; the branch switches; options refused
in one line naming the value. Tolerances (float32): 2e-5 absolute on outputs and gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import adaptive_sparse as core
from attention import nsa
from tests.attention import contract

ATOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """Tiny programs: compile with few optimizations (as the contract suite does)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(autouse=True)
def _local_staging(request):
  """The value checks only run on this CPU: they stage the XLA forms only (the default traces the GPU and TPU kernels
  of every kernel-backed op too). The export test (marked `export`) keeps the default; the module is therefore not in
  tests/conftest.py's CPU_ONLY_MODULES, whose modules export nothing."""
  from kernels import platform  # pylint: disable=import-outside-toplevel
  if request.node.get_closest_marker("export") is not None:
    yield
    return
  with platform.staging("local"):
    yield

TINY = dict(num_heads=4, num_kv_heads=2, compress_block=4, compress_stride=2, select_block=4, num_selected=3,
            num_local_blocks=1, window=4, query_chunk=8)


def compare_to_reference(name: str, *, length: int = 19, features: int = 16, causal: bool, atol: float = ATOL,
                         dropout_rate: float = 0.1, implementations=("flex", "xla"), **options) -> dict:
  """The layer's flex and gathered forms against its dense token-mask form (`implementation="reference"`) on the
  same parameters: outputs and gradients (parameters and input), with padding and attention dropout."""
  x = jax.random.normal(jax.random.key(0), (2, length, features))
  mask = jnp.arange(length)[None, :] < jnp.array([[length - 5], [length]])
  layers = {impl: attention.build(name, causal=causal, dropout_rate=dropout_rate, implementation=impl, **options)
            for impl in (*implementations, "reference")}
  variables = jax.jit(layers["reference"].init)(contract.RNGS, x)
  w = jax.random.normal(jax.random.key(1), x.shape) * mask[..., None]
  frozen = {k: v for k, v in variables.items() if k != "params"}

  @jax.jit
  def run(params, x):
    def loss(impl, params, x):
      y = layers[impl].apply({**frozen, "params": params}, x, mask=mask, deterministic=False,
                             rngs={"dropout": jax.random.key(2), "attention": jax.random.key(3)})
      return jnp.sum(y * w), y
    return {impl: jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1), has_aux=True)(params, x)
            for impl in layers}

  out = run(variables["params"], x)
  (_, y_r), g_r = out["reference"]
  for impl in implementations:
    (_, y_x), g_x = out[impl]
    np.testing.assert_allclose(y_x, y_r, atol=atol, rtol=1e-4, err_msg=impl)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4, err_msg=impl), g_x, g_r)
  assert np.abs(np.asarray(g_r[1])).sum() > 0
  return variables


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gathered_form_equals_the_dense_token_mask_reference(causal):
  compare_to_reference("nsa", causal=causal, **TINY)


def _numpy_selection(q, kc, *, valid_c, k_pos_c, coverage, first_real, causal, num_keys, select_block,
                     num_local_blocks, num_selected):
  """The oracle: dense compressed probabilities, importance per group, the selection rules, a stable sort."""
  b, l, h, d = q.shape
  hkv = kc.shape[2]
  qg = q.reshape(b, l, hkv, h // hkv, d)
  scores = np.einsum("blxgd,bsxd->bxgls", qg, kc) * d ** -0.5
  allowed = valid_c[:, None, None, None, :] & ((k_pos_c[None, :] <= np.arange(l)[:, None]) if causal else True)
  scores = np.where(allowed, scores, -np.inf)
  m = np.max(scores, axis=-1, keepdims=True)
  e = np.where(allowed, np.exp(scores - np.where(np.isfinite(m), m, 0)), 0)
  p = e / np.maximum(e.sum(-1, keepdims=True), 1e-30)
  importance = np.einsum("bxgln,nm->blxm", p, coverage)
  out = np.full((b, l, hkv, num_selected), -1)
  for bi in range(b):
    for t in range(l):
      own = t // select_block
      for x in range(hkv):
        s = importance[bi, t, x].copy()
        for j in range(s.shape[0]):
          reach = t if causal else num_keys - 1
          if first_real[bi, j] > reach:
            s[j] = -np.inf
          elif j == 0 or own - num_local_blocks < j <= own:
            s[j] = np.inf
        order = np.argsort(-s, kind="stable")[:num_selected]
        out[bi, t, x] = np.where(s[order] == -np.inf, -1, order)
  return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_top_n_block_lists_equal_a_numpy_oracle(causal):
  b, l, h, hkv, d, ls, cb, cs, n = 2, 24, 4, 2, 8, 4, 4, 2, 3
  kq, kk = jax.random.split(jax.random.key(5))
  q = jax.random.normal(kq, (b, l, h, d))
  nc = nsa.num_compressed_tokens(l, cb, cs)
  kc = jax.random.normal(kk, (b, nc, hkv, d))
  real = np.arange(l)[None, :] < np.array([[l - 7], [l]])
  valid_c = np.array([[real[i, j * cs:j * cs + cb].any() for j in range(nc)] for i in range(b)])
  k_pos_c = np.arange(nc) * cs + cb - 1
  coverage = nsa.coverage_matrix(nc, l // ls, compress_block=cb, compress_stride=cs, select_block=ls)
  first_real = np.asarray(core.first_real_position(jnp.asarray(real), b, l, ls))
  rules = dict(select_block=ls, num_local_blocks=1, num_selected=n, causal=causal, num_keys=l)
  choose = functools.partial(nsa.select_blocks, coverage_NcxNs=jnp.asarray(coverage),
                             first_real_BxNs=jnp.asarray(first_real), **rules)
  _, idx = jax.jit(lambda q, kc: core.summary_attention(
      q, kc, kc, k_pos_S=jnp.asarray(k_pos_c), key_valid_BxS=jnp.asarray(valid_c), causal=causal, scale=d ** -0.5,
      query_chunk=5, probs_fn=choose))(q, kc)
  expected = _numpy_selection(np.asarray(q), np.asarray(kc), valid_c=valid_c, k_pos_c=k_pos_c, coverage=coverage,
                              first_real=first_real, **rules)
  np.testing.assert_array_equal(np.asarray(idx), expected)
  assert (expected >= 0).sum() > b * l * hkv  # more than the forced block: the scores chose
  # Coverage: each compressed token's strides are spread over the blocks it overlaps (total l / d per token).
  np.testing.assert_allclose(coverage.sum(axis=1), cb / cs)


@pytest.mark.parametrize("length,cb,cs,ls", [(64, 4, 2, 4), (1000, 32, 16, 64), (100, 8, 4, 16), (20, 32, 16, 64)])
def test_coverage_bands_sum_equals_the_coverage_product(length, cb, cs, ls):
  """Importance is summed over each block's band of compressed tokens (`coverage_bands`): equal to Eq. 9's product
  with the dense coverage matrix (including a sequence without any compressed token)."""
  nc, ns = nsa.num_compressed_tokens(length, cb, cs), -(-length // ls)
  coverage = nsa.coverage_matrix(nc, ns, compress_block=cb, compress_stride=cs, select_block=ls)
  idx, w = nsa.coverage_bands(coverage)
  assert idx.shape[1] <= (cb + ls) // cs + 1  # banded: a short sum per block
  p = np.random.default_rng(0).random((3, nc)).astype(np.float32)
  banded = (p[:, idx] * w).sum(-1) if nc else np.zeros((3, ns), np.float32)
  np.testing.assert_allclose(banded, p @ coverage, rtol=1e-6, atol=1e-6)


def test_decoding_equals_the_parallel_causal_output():
  """20 steps: compressed tokens appended every d steps, selection per step, the window, GQA."""
  contract.check_decode("nsa", length=20, **TINY)


def test_ablations_and_selection_not_differentiated():
  """Each branch switch changes the output; with the compressed branch off, no gradient reaches the compressor
  (only the integer selection reads it); with it on, one does."""
  x = jax.random.normal(jax.random.key(0), (1, 16, 16))
  # The gathered form: a smaller program to compile than flex's (the branch logic is the same).
  layers = {s: attention.build("nsa", causal=True, implementation="xla", **TINY, **({s: False} if s else {}))
            for s in ("", "use_compressed", "use_selected", "use_window")}
  variables = jax.jit(layers[""].init)(contract.RNGS, x)

  @jax.jit
  def run(params):
    outs = {s: layer.apply({"params": params}, x) for s, layer in layers.items()}
    grads = {s: jax.grad(lambda p, s=s: jnp.sum(layers[s].apply({"params": p}, x) ** 2))(params)
             for s in ("", "use_compressed")}
    return outs, grads

  outs, grads = run(variables["params"])
  for switch in ("use_compressed", "use_selected", "use_window"):
    assert np.abs(np.asarray(outs[""] - outs[switch])).max() > 1e-4, switch
  compressor = lambda g: sum(float(jnp.abs(v).sum()) for k, v in jax.tree_util.tree_leaves_with_path(g)  # noqa
                             if "compress_key" in jax.tree_util.keystr(k))
  assert compressor(grads[""]) > 0
  assert compressor(grads["use_compressed"]) == 0.0


@pytest.mark.parametrize("options,needle", [
    (dict(num_selected=9), "num_selected=9"),
    (dict(compress_stride=3), "compress_stride=3"),
    (dict(window=2), "window=2"),
    (dict(select_block=3, compress_block=3, compress_stride=3, window=3, num_selected=2, num_kv_heads=3),
     "num_kv_heads=3"),
])
def test_bad_options_are_refused_in_one_line(options, needle):
  with pytest.raises(ValueError) as e:
    attention.build("nsa", **{**TINY, **options}).init(contract.RNGS, jnp.ones((1, 16, 16)))
  assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_paper_defaults_build_at_short_lengths():
  """num_selected=None (moba: top_k=None) is the paper's count capped at the blocks a short sequence has."""
  for name in ("nsa", "moba"):
    layer = attention.build(name, num_heads=2, causal=True)
    shapes = jax.eval_shape(layer.init, contract.RNGS, jnp.ones((1, 128, 16)))
    assert jax.tree.leaves(shapes["params"])


@pytest.mark.export
def test_bfloat16_wikitext2_training_step_exports_for_cuda_and_tpu(tmp_path):
  """The bfloat16 WikiText-2 training step (1 layer, 512 tokens, head dim 64, NSA at the paper's selection block
  l' = 64 with l = 32, d = 16, w = 64 scaled to 512 tokens) exports for cuda and tpu from this CPU host with the
  selection traced (`top_k` in the module), and on both the selected branch holds the flex kernels, forward and
  backward (the per-token selection mask closes over the traced selection: XLA evaluates it on the listed partial
  tiles, the kernels read those tile bitmaps). No dense `[L, L]` tensor. NOT a bound on memory: the bitmaps'
  static capacity follows the tile lists' width, which is every key tile at this length (`[B, Hkv, Tq, Tk, 64,
  64]`: L x L elements in tile form; `kernels.flex.tables`, a named shortcut of issue 34)."""
  import re  # pylint: disable=import-outside-toplevel

  from configs import wikitext2  # pylint: disable=import-outside-toplevel
  from lra.training import trainer  # pylint: disable=import-outside-toplevel

  for split in ("train", "valid", "test"):
    (tmp_path / f"wiki.{split}.tokens").write_text(" the cat sat on the mat . \n the dog sat on the log . \n" * 20)
  config = wikitext2.get_config("attention=nsa")
  config.model.update(dtype="bfloat16", num_layers=1, num_heads=2, qkv_dim=128, emb_dim=128, mlp_dim=128)
  config.model.attention.update(compress_block=32, compress_stride=16, select_block=64, num_selected=4, window=64,
                                num_kv_heads=1)
  config.data.update(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), max_length=512)
  config.train.batch_size = config.train.eval_batch_size = 2
  experiment = trainer.Experiment(config)
  rep, data = experiment.replicated, experiment.batch_sharding
  abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  state = jax.tree_util.tree_map(lambda x: abstract(x, rep), jax.eval_shape(experiment.init_state))
  batch = {k: abstract(v, data) for k, v in experiment.task.dummy_batch(2).items()}
  length = batch["inputs"].shape[1]
  assert length == 512, length
  for platform in ("cuda", "tpu"):
    module = jax.export.export(experiment.jit_train_step, platforms=[platform])(
        state, batch, abstract(experiment.key, rep)).mlir_module()
    assert "bf16" in module and "top_k" in module, platform
    for name in ("flex_fwd", "flex_bwd_dq", "flex_bwd_dkv"):
      assert re.search(rf"\b{name}\b", module), f"{platform}: {name}"
    square = [t for t in re.findall(r"tensor<([0-9x]+)x\w+>", module)
              if sum(int(d) == length for d in t.split("x")) >= 2]
    assert not square, f"[L, L] tensors in the nsa step for {platform}: {square[:5]}"
