"""MoBA (attention/moba.py): the gathered form against the dense token-mask reference of the same selection (values
and gradients, padding, dropout, causal and not, with and without VSA's coarse branch); the top-k block lists
against a numpy oracle (own block always in, ties to the lower block); top_k larger than the blocks refused.
Tolerances (float32): 2e-5 absolute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import adaptive_sparse as core
from attention import moba
from tests.attention import contract
from tests.attention.test_nsa import _fast_compiles, compare_to_reference  # noqa: F401  (the module fixture)

TINY = dict(num_heads=2, block_size=4, top_k=2, query_chunk=8)


# The fine selection both ways, the coarse branch (VSA) bidirectionally. Coarse and causal (the costliest case) is
# checked on the flex form by the contract suite (OPTIONS' coarse case: causality by gradients, padding, dropout) and
# against the parallel output by `test_decoding_equals_the_parallel_causal_output`; its causal masks are the fine
# selection's (compared here) and `core.summary_attention`'s (NSA's compressed branch, compared causal in test_nsa).
@pytest.mark.parametrize("causal,coarse", [(True, False), (False, False), (False, True)],
                         ids=["fine-causal", "fine-bidirectional", "coarse-bidirectional"])
def test_gathered_form_equals_the_dense_token_mask_reference(causal, coarse):
  compare_to_reference("moba", causal=causal, coarse=coarse, **TINY)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_top_k_block_lists_equal_a_numpy_oracle(causal):
  b, l, h, d, bs, k = 2, 20, 2, 8, 4, 3
  kq, kk = jax.random.split(jax.random.key(3))
  q, keys = jax.random.normal(kq, (b, l, h, d)), jax.random.normal(kk, (b, l, h, d))
  real = np.arange(l)[None, :] < np.array([[l - 6], [l]])
  kmean = moba.pooled(keys, jnp.asarray(real), bs)
  first_real = core.first_real_position(jnp.asarray(real), b, l, bs)
  idx = core.top_blocks(moba.gate_scores(q, kmean, jnp.arange(l), first_real, block_size=bs, causal=causal,
                                         num_keys=l), k)
  qn, kn = np.asarray(q), np.asarray(keys)
  expected = np.full((b, l, h, k), -1)
  for bi in range(b):
    means = [kn[bi, j * bs:(j + 1) * bs][real[bi, j * bs:(j + 1) * bs]].mean(0) if real[bi, j * bs:(j + 1) * bs].any()
             else None for j in range(l // bs)]
    for t in range(l):
      for hh in range(h):
        s = np.array([-np.inf if m is None or (causal and j > t // bs) else qn[bi, t, hh] @ m[hh]
                      for j, m in enumerate(means)])
        s[t // bs] = np.inf if means[t // bs] is not None else -np.inf
        order = np.argsort(-s, kind="stable")[:k]
        expected[bi, t, hh] = np.where(s[order] == -np.inf, -1, order)
  np.testing.assert_array_equal(np.asarray(idx), expected)
  assert np.all(np.any(np.asarray(idx) == (np.arange(l) // bs)[None, :, None, None], axis=-1)[real])  # own block in


def test_decoding_equals_the_parallel_causal_output():
  contract.check_decode("moba", length=14, coarse=True, **TINY)


def test_top_k_larger_than_the_blocks_is_refused_in_one_line():
  with pytest.raises(ValueError) as e:
    attention.build("moba", **{**TINY, "top_k": 5}).init(contract.RNGS, jnp.ones((1, 16, 16)))
  assert "top_k=5" in str(e.value) and "\n" not in str(e.value), str(e.value)
