"""Memory-compressed attention (attention/compressed.py): both modes against the dense token-mask reference (values
and gradients, padding, dropout, causal and not); the compression is a strided convolution (numpy); the paper's
alternating schedule; decoding equals the parallel causal output. Tolerances (float32): 2e-5 absolute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from tests.attention import contract
from tests.attention.test_nsa import _fast_compiles, compare_to_reference  # noqa: F401  (the module fixture)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("options", [dict(factor=3), dict(mode="local", block_size=4)], ids=["compressed", "local"])
def test_gathered_form_equals_the_dense_token_mask_reference(causal, options):
  compare_to_reference("compressed", causal=causal, num_heads=2, query_chunk=8, **options)


def test_the_layer_equals_numpy_strided_convolution_attention():
  """Bidirectional, no padding: q = x Wq; keys and values compressed by a kernel = stride = 3 convolution; softmax
  over the compressed tokens; the output projection (numpy, float64)."""
  layer = attention.build("compressed", num_heads=2, factor=3)
  x = jax.random.normal(jax.random.key(0), (1, 9, 8))
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), layer.init(contract.RNGS, x)["params"])
  xn = np.asarray(x, np.float64)[0]
  proj = lambda name: np.einsum("lf,fhd->lhd", xn, params[name]["kernel"]) + params[name]["bias"]  # noqa: E731
  q, k, v = proj("query"), proj("key"), proj("value")  # [9, 2, 4]

  def conv(t, name):  # [9, H, D] -> [3, H, D]
    kernel, bias = params[f"compress_{name}"]["kernel"], params[f"compress_{name}"]["bias"]  # [3, HD, HD], [HD]
    flat = t.reshape(9, 8)
    return np.stack([sum(flat[3 * i + j] @ kernel[j] for j in range(3)) + bias for i in range(3)]).reshape(3, 2, 4)

  kc, vc = conv(k, "key"), conv(v, "value")
  scores = np.einsum("lhd,shd->hls", q, kc) / 2.0
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = np.einsum("hls,shd->lhd", weights, vc)
  expected = np.einsum("lhd,hdf->lf", y, params["out"]["kernel"]) + params["out"]["bias"]
  np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x))[0], expected, atol=1e-5)


def test_the_paper_alternates_local_and_compressed_layers():
  resolved = attention.resolve("compressed", 5, {})
  assert [layer["mode"] for layer in resolved] == ["local", "compressed", "local", "compressed", "local"]


@pytest.mark.parametrize("mode", ["compressed", "local"])
def test_decoding_equals_the_parallel_causal_output(mode):
  contract.check_decode("compressed", length=11, num_heads=2, mode=mode, factor=2, block_size=4)
