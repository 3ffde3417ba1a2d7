"""kernels.softmax: every implementation against the dense reference (values and gradients), the flash block primitive,
attention dropout by the shared hash, the compiled memory of the XLA flash form, and the kernel dispatch.

Shapes are tiny; the XLA form runs with small chunks (`chunk_size=4`) so that lengths that are not multiples of the
chunk, several query chunks and the causal schedule are exercised; "interpret" runs the Pallas kernels on CPU.
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import platform
from kernels.common import MASK_VALUE, dropout_seed
from kernels.softmax import flash_block, softmax_attention, softmax_attention_reference, softmax_attention_xla
from kernels.softmax import pallas as softmax_pallas
from kernels.softmax.xla import _pairs

# float32: flash and reference both accumulate in float32 and differ only in summation order (online softmax over
# chunks). bfloat16: inputs and outputs carry 8 mantissa bits and the weights fed to the second matmul are rounded to
# bfloat16 (in both forms, at different points: chunk-local vs global normalization): about 1% of O(1) magnitudes.
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}
GRAD_TOL = {jnp.float32: dict(atol=5e-5, rtol=1e-4), jnp.bfloat16: dict(atol=8e-2, rtol=8e-2)}


def _qkv(b, length, keys, h, d, dtype=jnp.float32, seed=0):
  kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, length, h, d), dtype)
  k = jax.random.normal(kk, (b, keys, h, d), dtype)
  v = jax.random.normal(kv, (b, keys, h, d), dtype)
  return q, k, v, jax.random.normal(kc, (b, length, h, d), jnp.float32)


def _key_mask(b, keys):
  """Row 0 half padded, row 1 all padding (its queries see no key: zeros out, finite gradients), others full."""
  lengths = np.array([keys // 2 + 1, 0] + [keys] * (b - 2))
  return jnp.asarray(np.arange(keys)[None, :] < lengths[:, None])


def _both(want_fn, got_fn, q, k, v, ct):
  """Output and input gradients for cotangent `ct` of `want_fn` and of `got_fn`, in one compiled program (one
  compilation instead of two, or of op-by-op dispatch)."""
  def run(q, k, v, ct):
    results = []
    for fn in (want_fn, got_fn):
      out, vjp = jax.vjp(fn, q, k, v)
      results.append((out, vjp(ct.astype(out.dtype))))
    return results
  return jax.jit(run)(q, k, v, ct)


def _assert_matches(got, want, dtype):
  (out, grads), (out_ref, grads_ref) = got, want
  assert out.dtype == out_ref.dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_ref, np.float32), **TOL[dtype])
  for g, w in zip(grads, grads_ref):
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **GRAD_TOL[dtype])


# ----------------------------------------------------------------------------------------------------------------------
# The XLA flash form against the reference.


# Lengths 11 and 13 are not multiples of the chunk (4); (1, 13) and (5, 13) are decoding (L != S, queries aligned to
# the last keys).
@pytest.mark.parametrize("length,keys,causal,dtype", [(11, 11, False, jnp.float32), (11, 11, True, jnp.float32),
                                                      (16, 16, True, jnp.bfloat16), (1, 13, False, jnp.float32),
                                                      (5, 13, True, jnp.float32)])
def test_xla_matches_reference(length, keys, causal, dtype):
  q, k, v, ct = _qkv(3, length, keys, 2, 8, dtype)
  km = _key_mask(3, keys)
  opts = dict(key_mask=km, causal=causal)
  want, got = _both(lambda q, k, v: softmax_attention_reference(q, k, v, **opts),
                    lambda q, k, v: softmax_attention_xla(q, k, v, chunk_size=4, **opts), q, k, v, ct)
  _assert_matches(got, want, dtype)
  assert not np.any(np.asarray(got[0][1], np.float32)), "a row whose keys are all padding must output 0"


@pytest.mark.parametrize("causal,implementation", [(False, "xla"), (True, None)])  # None on CPU: the XLA form
def test_alibi_matches_reference(causal, implementation):
  q, k, v, ct = _qkv(2, 11, 11, 3, 8)
  slopes = jnp.array([0.05, 0.5, 2.0])
  opts = dict(key_mask=_key_mask(2, 11), causal=causal, alibi_slopes=slopes)
  want, got = _both(lambda q, k, v: softmax_attention(q, k, v, implementation="reference", **opts),
                    lambda q, k, v: softmax_attention(q, k, v, implementation=implementation, **opts), q, k, v, ct)
  _assert_matches(got, want, jnp.float32)
  # The bias is really there: without it the output differs.
  assert not np.allclose(want[0], softmax_attention_reference(q, k, v, key_mask=opts["key_mask"], causal=causal))
  # ALiBi at decode: the single query sits at the last position.
  q1 = q[:, -1:]
  np.testing.assert_allclose(softmax_attention(q1, k, v, alibi_slopes=slopes, implementation="xla"),
                             softmax_attention_reference(q, k, v, alibi_slopes=slopes, causal=True)[:, -1:],
                             **TOL[jnp.float32])


# The flex kernels take ALiBi as a pure index score_mod: the paper's slopes through `flex.alibi` (its kernels and
# lowering are flex's tests), any other constant slopes through one select per head, checked here (13 tokens in one
# 64-token tile: padded keys masked, rows cut off).
def test_alibi_in_the_kernels_matches_reference():
  # The paper's 3-head slopes (attention.positions.alibi_slopes): 2^-4, 2^-8 (the lower power's), 2^-2 (the higher's).
  assert softmax_pallas.alibi_score_mod((2.0 ** -4, 2.0 ** -8, 2.0 ** -2)).__qualname__.startswith("alibi.")
  slopes = np.asarray([0.05, 0.5, 2.0], np.float32)
  assert not softmax_pallas.alibi_score_mod(tuple(float(s) for s in slopes)).__qualname__.startswith("alibi.")
  q, k, v, ct = _qkv(2, 13, 13, 3, 8)
  opts = dict(key_mask=_key_mask(2, 13), causal=True, alibi_slopes=slopes)
  want, got = _both(lambda q, k, v: softmax_attention(q, k, v, implementation="reference", **opts),
                    lambda q, k, v: softmax_attention(q, k, v, implementation="interpret", **opts), q, k, v, ct)
  _assert_matches(got, want, jnp.float32)
  assert not np.allclose(want[0], softmax_attention_reference(q, k, v, key_mask=opts["key_mask"], causal=True))


def test_causal_skips_the_chunks_above_the_diagonal():
  pairs = _pairs(8, 8, 512, 512, True, 0, 0)
  assert len(pairs) == 8 * 9 // 2 and np.all(pairs[:, 1] <= pairs[:, 0])
  assert len(_pairs(8, 8, 512, 512, False, 0, 0)) == 64
  # Decode-aligned queries (offset S - L) need every key chunk up to theirs; traced offsets compute every pair.
  assert len(_pairs(1, 4, 1, 4, True, 15, 0)) == 4
  assert len(_pairs(2, 2, 4, 4, True, jnp.int32(0), 0)) == 4
  # And in the compiled backward: the causal loop runs the triangular number of steps.
  q, k, v, _ = _qkv(1, 64, 64, 1, 8)
  loss = lambda causal: lambda q: jnp.sum(softmax_attention_xla(q, k, v, causal=causal, chunk_size=8))  # noqa: E731
  trips = lambda f: sorted(int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"',  # noqa: E731
                                                       jax.jit(jax.grad(f)).lower(q).compile().as_text()))
  assert trips(loss(True)) == [36, 36] and trips(loss(False)) == [64, 64]


# ----------------------------------------------------------------------------------------------------------------------
# Every implementation through the public entry.


# None (on CPU: the XLA form) is `test_alibi_matches_reference`'s; the XLA form's causal schedule through its own
# function is `test_xla_matches_reference`'s.
@pytest.mark.parametrize("implementation,causal", [("xla", False), ("interpret", False), ("interpret", True)])
def test_implementations_match_reference(implementation, causal):
  # 13 tokens: the kernels pad to 16 (masked keys, cut-off rows).
  q, k, v, ct = _qkv(3, 13, 13, 2, 8)
  opts = dict(key_mask=_key_mask(3, 13), causal=causal)
  want, got = _both(lambda q, k, v: softmax_attention(q, k, v, implementation="reference", **opts),
                    lambda q, k, v: softmax_attention(q, k, v, implementation=implementation, **opts), q, k, v, ct)
  _assert_matches(got, want, jnp.float32)


def test_grouped_query_attention_equals_repeated_heads():
  """k, v with 2 heads serve 4 query heads: the kernels take the groups as they are (one K/V load per group), equal to
  the reference on K/V repeated per group, with dropout (counters by query head) and key padding."""
  q, k, v, ct = _qkv(2, 13, 13, 4, 8)
  k, v = k[:, :, :2], v[:, :, :2]
  opts = dict(key_mask=_key_mask(2, 13), causal=True, dropout_rate=0.2, dropout_rng=jax.random.key(3))
  rep = lambda x: jnp.repeat(x, 2, axis=2)  # noqa: E731
  want, got = _both(lambda q, k, v: softmax_attention(q, rep(k), rep(v), implementation="reference", **opts),
                    lambda q, k, v: softmax_attention(q, k, v, implementation="interpret", **opts), q, k, v, ct)
  _assert_matches(got, want, jnp.float32)


@pytest.mark.parametrize("implementation", ["interpret"])  # the XLA form's bfloat16 case is in test_xla_matches_...
def test_bfloat16_matches_reference(implementation):
  q, k, v, ct = _qkv(2, 16, 16, 2, 8, jnp.bfloat16)
  opts = dict(key_mask=_key_mask(2, 16), causal=True)
  want, got = _both(lambda q, k, v: softmax_attention(q, k, v, implementation="reference", **opts),
                    lambda q, k, v: softmax_attention(q, k, v, implementation=implementation, **opts), q, k, v, ct)
  _assert_matches(got, want, jnp.bfloat16)


# The kernels' dropout against the reference mask (causal, padded, grouped heads): test_grouped_query_attention_....
@pytest.mark.parametrize("implementation,causal", [("xla", True), ("xla", False)])
def test_dropout_uses_the_reference_mask(implementation, causal):
  q, k, v, ct = _qkv(2, 13, 13, 2, 8)  # padded to 16 by the kernels: the counters of real tokens are unchanged
  opts = dict(key_mask=_key_mask(2, 13), causal=causal, dropout_rate=0.3, dropout_rng=jax.random.key(7))
  want, got = _both(lambda q, k, v: softmax_attention(q, k, v, implementation="reference", **opts),
                    lambda q, k, v: softmax_attention(q, k, v, implementation=implementation, **opts), q, k, v, ct)
  _assert_matches(got, want, jnp.float32)
  undropped = softmax_attention(q, k, v, key_mask=opts["key_mask"], causal=causal, implementation=implementation)
  assert not np.allclose(got[0], undropped), "dropout must change the output"
  other = softmax_attention(q, k, v, implementation=implementation, **{**opts, "dropout_rng": jax.random.key(8)})
  assert not np.allclose(got[0], other), "another key must give another mask"


def test_dropout_mean_over_seeds_is_the_undropped_output():
  q, k, v, _ = _qkv(1, 8, 8, 1, 4)
  seeds = jax.random.split(jax.random.key(0), 4000)
  run = lambda rng: softmax_attention(q, k, v, causal=True, implementation="xla", dropout_rate=0.2,  # noqa: E731
                                      dropout_rng=rng)
  mean = jnp.mean(jax.lax.map(run, seeds, batch_size=500), axis=0)
  # Per-element std of one draw is at most ~sqrt(rate / (1 - rate)) * max|v| ~ 1.2; over 4000 draws ~0.02 (4 sigma).
  np.testing.assert_allclose(mean, softmax_attention(q, k, v, causal=True, implementation="xla"), atol=0.08)


# ----------------------------------------------------------------------------------------------------------------------
# The block primitive (what ring attention builds on).


def test_flash_block_lse_and_its_cotangent():
  q, k, v, ct = _qkv(2, 9, 13, 2, 8)
  km = _key_mask(2, 13)
  ct_lse = jax.random.normal(jax.random.key(9), (2, 2, 9))

  def dense(q, k, v):
    s = jnp.einsum("blhd,bshd->bhls", q, k) * 8 ** -0.5
    s = jnp.where(km[:, None, None, :], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    return softmax_attention_reference(q, k, v, key_mask=km), jnp.where(jnp.isfinite(lse), lse, MASK_VALUE)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v)[0] * ct) + jnp.sum(jnp.where(km.any(-1)[:, None, None], ct_lse, 0.0)
                                                                 * fn(q, k, v)[1])

  block = lambda q, k, v: flash_block(q, k, v, key_mask=km, q_offset=4, chunk_size=4)  # noqa: E731
  # Values and gradients of both in one compiled program.
  ((out, lse), grads), ((out_ref, lse_ref), grads_ref) = jax.jit(lambda q, k, v: [
      (fn(q, k, v), jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)) for fn in (block, dense)])(q, k, v)
  np.testing.assert_allclose(out, out_ref, **TOL[jnp.float32])
  np.testing.assert_allclose(lse, lse_ref, **TOL[jnp.float32])
  assert out.dtype == lse.dtype == jnp.float32 and lse.shape == (2, 2, 9)
  for g, w in zip(grads, grads_ref):
    np.testing.assert_allclose(g, w, **GRAD_TOL[jnp.float32])


def test_flash_blocks_combine_like_ring_attention():
  """Two key blocks at traced global offsets, merged by their log-sum-exps, equal one causal call with dropout."""
  q, k, v, ct = _qkv(2, 12, 12, 2, 8)
  rng = jax.random.key(3)
  seed = dropout_seed(rng)

  def ring(q, k, v):
    parts = [flash_block(q, k[:, s:s + 6], v[:, s:s + 6], causal=True, dropout_rate=0.25, seed=seed,
                         q_offset=jnp.int32(0), k_offset=jnp.int32(s), chunk_size=4) for s in (0, 6)]
    lse = jnp.logaddexp(parts[0][1], parts[1][1])
    weight = lambda part_lse: jnp.swapaxes(jnp.exp(part_lse - lse), 1, 2)[..., None]  # noqa: E731
    return sum(weight(part_lse) * out for out, part_lse in parts)

  full = lambda q, k, v: softmax_attention_reference(q, k, v, causal=True, dropout_rate=0.25,  # noqa: E731
                                                     dropout_rng=rng)
  want, got = _both(full, ring, q, k, v, ct)
  _assert_matches(got, want, jnp.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Memory, dispatch and errors.


def test_xla_form_holds_no_length_squared_buffer_at_4k():
  length = 4096
  spec = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
  rng = jax.random.key(0)

  def temp_bytes(implementation):
    def loss(q, k, v):
      return jnp.sum(softmax_attention(q, k, v, causal=True, implementation=implementation, dropout_rate=0.1,
                                       dropout_rng=rng))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  square = length * length * 4
  assert temp_bytes("reference") >= square  # the measure sees an [L, L] buffer where there is one
  assert temp_bytes("xla") < square // 8


def test_explicit_kernels_never_fall_back():
  q, k, v, _ = _qkv(1, 16, 16, 1, 8)
  with pytest.raises(platform.KernelUnavailableError, match="softmax_attention: implementation='pallas'"):
    softmax_attention(q, k, v, implementation="pallas")  # CPU has no kernel
  with pytest.raises(ValueError, match="implementation='interpret' cannot serve this call: queries"):
    softmax_attention(q[:, :1], k, v, implementation="interpret")
  with pytest.raises(ValueError, match="alibi_slopes are traced"):  # constant slopes only: they are index functions
    jax.jit(lambda s: softmax_attention(q, k, v, implementation="interpret", alibi_slopes=s))(jnp.ones((1,)))


def test_default_lowers_the_kernel_for_accelerators_and_logs_each_fallback_once(caplog):
  q = jax.ShapeDtypeStruct((1, 64, 1, 64), jnp.bfloat16)
  targets = {"cuda": "mosaic_gpu", "tpu": "tpu_custom_call"}
  disabled = [jax.export.DisabledSafetyCheck.custom_call(t) for t in ("mosaic_gpu_v2", "tpu_custom_call")]

  def lowered(platform_name, q_spec, k_spec):
    fn = lambda q, k, v: softmax_attention(q, k, v, causal=True)  # noqa: E731
    return jax.export.export(jax.jit(fn), platforms=[platform_name], disabled_checks=disabled)(
        q_spec, k_spec, k_spec).mlir_module()

  for name, target in targets.items():
    assert target in lowered(name, q, q)
  assert "custom_call @" not in lowered("cpu", q, q)
  decode_q = jax.ShapeDtypeStruct((1, 1, 1, 64), jnp.bfloat16)
  with caplog.at_level(logging.WARNING, logger="kernels"):
    for _ in range(2):
      module = lowered("cuda", decode_q, q)
  assert "mosaic_gpu" not in module
  notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("softmax_attention: ")]
  assert len(notes) == 1 and "cuda" in notes[0] and "decoding" in notes[0], notes


def test_alibi_training_lowers_the_flex_kernels_for_accelerators():
  q = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.bfloat16)
  slopes = np.asarray([0.3, 0.7], np.float32)  # not the paper's: the per-head selects of `alibi_score_mod`
  loss = lambda q, k, v: jnp.sum(softmax_attention(q, k, v, causal=True, alibi_slopes=slopes,  # noqa: E731
                                                   implementation="pallas").astype(jnp.float32))
  disabled = [jax.export.DisabledSafetyCheck.custom_call(t) for t in ("mosaic_gpu_v2", "tpu_custom_call")]
  for name in ("cuda", "tpu"):
    module = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[name],
                               disabled_checks=disabled)(q, q, q).mlir_module()
    for kernel in ("flex_fwd", "flex_bwd_dq", "flex_bwd_dkv"):
      assert re.search(rf"\b{kernel}", module), f"{name}: no {kernel}"


def test_one_plan_per_call(monkeypatch):
  """The entry plans each call once (`kernels.softmax.plan`: each backend's constraints once); the jitted body and the
  driver follow the plan, forward and backward, and check nothing again."""
  checked = []
  real = softmax_pallas.flex_check_supported
  monkeypatch.setattr(softmax_pallas, "flex_check_supported", lambda *a: checked.append(a[-1]) or real(*a))
  spec = jax.ShapeDtypeStruct((1, 16, 1, 8), jnp.float32)  # float32: the GPU plan is a reason, TPU's the kernel
  loss = lambda q, k, v: jnp.sum(softmax_attention(q, k, v, causal=True))  # noqa: E731
  jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(spec, spec, spec)
  assert sorted(checked) == ["gpu", "tpu"]


def test_bad_inputs_name_the_values():
  q, k, v, _ = _qkv(2, 8, 8, 2, 4)
  with pytest.raises(ValueError, match=r"key_mask must be bool \[batch, keys\] = \(2, 8\)"):
    softmax_attention(q, k, v, key_mask=jnp.ones((2, 1, 1, 8), bool))
  with pytest.raises(ValueError, match=r"alibi_slopes must have shape \[heads\] = \(2,\)"):
    softmax_attention(q, k, v, alibi_slopes=jnp.ones((3,)))
  with pytest.raises(ValueError, match="key/value heads 2 must divide the query heads 3"):
    softmax_attention(jnp.ones((2, 8, 3, 4)), k, v)
  with pytest.raises(ValueError, match="unknown softmax_attention implementation .cudnn."):
    softmax_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="dropout_rate must be in"):
    softmax_attention(q, k, v, dropout_rate=1.0, dropout_rng=jax.random.key(0))
