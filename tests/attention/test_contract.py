"""The layer contract, checked on every registered attention variant (docs/architecture.md, "Attention layers").

Parametrized over `attention.names()` when the tests are collected: registering a variant, also from outside the
package (see `tests/attention/conftest.py`), is all it takes to have it checked here. `OPTIONS` only shrinks sizes (and
adds a second configuration where a variant has two code paths); a variant missing from it runs with its defaults.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest

import attention
from tests.attention import contract

# Tiny sizes: lengths 8-12 against block sizes 3-5 cover both padded and unpadded block layouts.
OPTIONS: dict[str, list[dict]] = {
    "based": [{"window": 3, "feature_dim": 4, "chunk_size": 4}],
    # flex: every built-in mask once (the combinators carry the rest), every score, GQA, a partial last tile; the
    # combinations on the op's dense form (its XLA form costs minutes under jacrev here; tests/kernels check it).
    "flex": [{"mask": "sliding_window", "window": 3, "block_size": 4, "score": "relative_bias", "num_kv_heads": 1},
             {"mask": "and_masks", "masks": ("document", "dilated", "causal"), "window": 3, "dilation": 2,
              "block_size": 4, "score": "softcap", "implementation": "reference"},
             {"mask": "or_masks", "masks": ("prefix_lm", "global_window", "full"), "prefix_length": 3, "window": 2,
              "block_size": 4, "score": "alibi", "implementation": "reference"}],
    "bigbird": [{"block_size": 5, "window": 1, "num_global_blocks": 1, "num_random_blocks": 1}],
    "grassmann": [{"reduced_dim": 4, "offsets": (1, 3)}],
    "linear": [{"chunk_size": 4}],
    "linformer": [{"k": 4}],
    "local": [{"block_size": 5, "window": 3}],
    "longformer": [{"block_size": 4, "window": 1, "num_global_blocks": 1}],
    "performer": [{"num_features": 16, "chunk_size": 4}],
    "reformer": [{"chunk_len": 4, "n_buckets": 2}],
    "sinkhorn": [{"block_size": 3}],
    "softmax": [{}],
    "sparse_transformer": [{"block_size": 2, "stride": 3}],
    "synthesizer": [{"mode": "dense"}, {"mode": "factorized", "factor_k": 4, "trainable_random": False,
                                        "mix_dot_product": True}],
    "transnormer": [{"mode": "norm", "chunk_size": 4}, {"mode": "diag", "block_size": 4}],
    # Content-adaptive sparsity: blocks of 3-4 at lengths 7-12 (padded last blocks), GQA, each mode once.
    "nsa": [{"compress_block": 4, "compress_stride": 2, "select_block": 4, "num_selected": 2, "num_local_blocks": 1,
             "window": 4, "num_kv_heads": 1, "query_chunk": 4}],
    "moba": [{"block_size": 4, "top_k": 2, "query_chunk": 4}, {"block_size": 3, "top_k": 2, "coarse": True}],
    "compressed": [{"factor": 3, "query_chunk": 4}, {"mode": "local", "block_size": 4}],
    "routing": [{"num_clusters": 2, "local_window": 3, "num_local_heads": 1},
                {"num_clusters": 3, "num_local_heads": 0}],
    # The gated / delta-rule family: chunks of 4 at lengths 7-12 (a padded last chunk); d_state 4, low rank 4.
    "retnet": [{"chunk_size": 4}],
    "gla": [{"chunk_size": 4, "gate_low_rank": 4}],
    "mamba2": [{"chunk_size": 4, "d_state": 4}],
    "deltanet": [{"chunk_size": 4}],
    "gated_deltanet": [{"chunk_size": 4}],
}
# The recurrent family keeps a decode cache whose size does not depend on the sequence length.
RECURRENT = ("based", "grassmann", "linear", "performer", "transnormer", "retnet", "gla", "mamba2", "deltanet",
             "gated_deltanet")


def _cases() -> list:
  cases = []
  for name in attention.names():
    configs = OPTIONS.get(name, [{}])
    for i, options in enumerate(configs):
      suffix = "" if i == 0 else "-" + "-".join(f"{k}={v}" for k, v in options.items() if k != "chunk_size")
      cases.append(pytest.param(name, {"num_heads": 2, **options}, id=name + suffix))
  return cases


CASES = _cases()


@pytest.fixture(scope="module", autouse=True)
def _cpu_only_staging():
  """Every check here runs on this CPU and exports nothing: the kernel-backed variants stage only their XLA forms,
  not their TPU and GPU kernels as well (kernels/platform.py `staging`; the kernels are checked in tests/kernels)."""
  from kernels import platform  # pylint: disable=import-outside-toplevel
  with platform.staging("local"):
    yield


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """These tiny layers spend far more time in XLA's optimizer than running: compile them with few optimizations."""
  try:
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
  except (AttributeError, KeyError, ValueError):  # the option is gone in this jax: compile as usual
    yield
    return
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.mark.parametrize("name,options", CASES)
def test_shape_padding_jit_and_grad(name, options):
  contract.check_layer(name, **options)


@pytest.mark.parametrize("name,options", CASES)
def test_causal(name, options):
  if attention.get_class(name).supports_causal:
    contract.check_causal(name, **options)
  else:
    contract.check_not_causal_raises(name, **options)


@pytest.mark.parametrize("name,options", CASES)
def test_decode(name, options):
  cls = attention.get_class(name)
  if not getattr(cls, "supports_decode", False):
    contract.check_no_decode_raises(name, **options)
    return
  contract.check_decode(name, **options)
  if getattr(cls, "fixed_size_cache", False) or name in RECURRENT:
    contract.check_fixed_size_cache(name, **options)


@pytest.mark.parametrize("name,options", CASES)
def test_bfloat16(name, options):
  contract.check_bfloat16(name, **options)


def test_the_recurrent_family_declares_a_fixed_size_cache():
  for name in RECURRENT:
    cls = attention.get_class(name)
    assert cls.supports_decode and cls.fixed_size_cache, name


BROKEN_PLUGIN = textwrap.dedent('''
    """A variant registered from outside the package that reads the future and the padding: reversed cumsum."""
    import flax.linen as nn
    import jax.numpy as jnp

    import attention


    @attention.register("broken_plugin_variant")
    class Broken(attention.AttentionLayer):
      @nn.compact
      def __call__(self, x, mask=None, deterministic=True):
        self.check_inputs(x, mask)
        v = self.project(x, "value")
        return self.project_out(jnp.flip(jnp.cumsum(jnp.flip(v, 1), 1), 1), x.shape[-1])
''')


def test_a_broken_plugin_variant_fails_by_name(tmp_path):
  (tmp_path / "broken_attention_plugin.py").write_text(BROKEN_PLUGIN)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "ATTENTION_PLUGINS": "broken_attention_plugin",
         "PYTHONPATH": os.pathsep.join([str(tmp_path), root, os.environ.get("PYTHONPATH", "")])}
  # `-k` selects the variant's shape/padding and causality tests, not this test (which would recurse).
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rf", "--tb=no",
             "tests/attention/test_contract.py", "-k",
             "(test_shape_padding_jit_and_grad or test_causal) and broken_plugin_variant"]
  result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)
  output = result.stdout + result.stderr
  assert result.returncode == 1, output  # 1: tests ran and some failed (not a collection or usage error)
  assert "FAILED tests/attention/test_contract.py::test_shape_padding_jit_and_grad[broken_plugin_variant]" in output
  assert "FAILED tests/attention/test_contract.py::test_causal[broken_plugin_variant]" in output
