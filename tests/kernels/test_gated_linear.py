"""`kernels.gated_linear` against its token-by-token recurrence: values and gradients of the chunked XLA form with
chunk sizes that do not divide the length, key padding, packed segments, decays near 0 and near 1, a decay per head
and per key dimension; float32 against a float64 recurrence; decode steps; carried states; bfloat16; errors.
Tolerances: float32 2e-5 (absolute on O(1) values); bfloat16 inputs 0.05 of the float32 output's scale."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gated_linear import gated_linear_reference, gated_linear_step
from kernels.gated_linear import gated_linear_attention as _entry
from kernels.gated_linear import gated_linear_pallas, mask_tokens
from kernels.gated_linear.tables import check_supported

B, L, H, K, V = 2, 11, 2, 4, 3
SEGMENTS = jnp.array([[0] * 4 + [1] * 7, [0] * 2 + [3] * 5 + [7] * 4])
KEY_MASK = jnp.arange(L)[None] < jnp.array([[8], [L]])
# log-decays: near 0 (a decay of e^-30..e^-5: the state forgets at once), near 1 (1 - 1e-4), and mixed.
REGIMES = {"near0": (-30.0, -5.0), "near1": (-1e-4, -1e-5), "mixed": (-3.0, 0.0)}


def _inputs(per_key: bool, regime: str, seed: int = 0, length: int = L):
  ks = jax.random.split(jax.random.key(seed), 5)
  q, k = (jax.random.normal(x, (B, length, H, K)) for x in ks[:2])
  v = jax.random.normal(ks[2], (B, length, H, V))
  lo, hi = REGIMES[regime]
  g = jax.random.uniform(ks[3], (B, length, H, K) if per_key else (B, length, H), minval=lo, maxval=hi)
  ct = jax.random.normal(ks[4], (B, length, H, V))
  return q, k, v, g, ct


# One compiled program per static configuration.
gated_linear_attention = jax.jit(_entry, static_argnames=("chunk_size", "return_state", "implementation"))


@functools.partial(jax.jit, static_argnames=("implementation", "chunk_size", "packed"))
def _value_and_grads(q, k, v, g, ct, *, implementation, chunk_size, packed):
  def f(q, k, v, g):
    out = _entry(q, k, v, g, chunk_size=chunk_size, key_mask=KEY_MASK,
                                 segment_ids=SEGMENTS if packed else None, implementation=implementation)
    return jnp.sum(out * ct), out
  (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, g)
  return out, grads


@pytest.mark.parametrize("per_key", [False, True], ids=["per_head", "per_key"])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_xla_matches_the_recurrence(per_key, regime):
  q, k, v, g, ct = _inputs(per_key, regime)
  for packed in (True,):  # segments and key padding together (the unpacked path: the decode and state tests)
    want, want_grads = _value_and_grads(q, k, v, g, ct, implementation="reference", chunk_size=1, packed=packed)
    for chunk_size in (3, 16):  # 3 does not divide 11; 16 is longer than the sequence
      got, grads = _value_and_grads(q, k, v, g, ct, implementation="xla", chunk_size=chunk_size, packed=packed)
      label = f"chunk={chunk_size} packed={packed}"
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=label)
      for name, a, b in zip("qkvg", grads, want_grads):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=f"{label} d{name}")
    assert np.all(np.isfinite(np.asarray(got)))


def test_padding_and_segments_act():
  """The masks do something: padded tokens are dropped from the state, and segments do not see each other."""
  q, k, v, g, _ = _inputs(False, "near1")
  hole = jnp.ones((B, L), bool).at[:, 3:5].set(False)  # padding in the middle: later tokens would read it
  out = gated_linear_attention(q, k, v, g, key_mask=hole, implementation="xla", chunk_size=3)
  noise = 5.0 * (~hole)[:, :, None, None]
  np.testing.assert_allclose(gated_linear_attention(q, k + noise, v + noise, g, key_mask=hole, implementation="xla",
                                                    chunk_size=3)[:, 5:], out[:, 5:], atol=1e-5)
  assert not np.allclose(gated_linear_attention(q, k + noise, v + noise, g, implementation="xla")[:, 5:], out[:, 5:])
  # Packed: the second segment of row 0 equals that segment run on its own.
  packed = gated_linear_attention(q, k, v, g, segment_ids=SEGMENTS, implementation="xla", chunk_size=3)
  alone = gated_linear_attention(q[:, 4:], k[:, 4:], v[:, 4:], g[:, 4:], implementation="xla", chunk_size=3)
  np.testing.assert_allclose(packed[0, 4:], alone[0], atol=1e-5)


@pytest.mark.parametrize("per_key", [False, True], ids=["per_head", "per_key"])
def test_float32_against_a_float64_recurrence(per_key):
  """Relative error below 1e-5 (of the output's largest magnitude) at 512 tokens; 4K: scripts/benchmark_gated.py."""
  length = 512
  q, k, v, g, _ = _inputs(per_key, "mixed", seed=3, length=length)
  g = g * 0.05  # long memories: many tokens contribute to each output
  got = jax.jit(lambda *a: gated_linear_attention(*a, implementation="xla"))(q, k, v, g)
  with jax.enable_x64(True):
    want, _ = jax.jit(gated_linear_reference)(*(np.asarray(x, np.float64) for x in (q, k, v, g)))
    want = np.asarray(want)
  assert want.dtype == np.float64
  error = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
  assert error < 1e-5, error


@pytest.mark.parametrize("per_key", [False, True], ids=["per_head", "per_key"])
def test_decode_steps_and_carried_states_equal_the_parallel_output(per_key):
  q, k, v, g, _ = _inputs(per_key, "mixed")
  want, final = gated_linear_attention(q, k, v, g, key_mask=KEY_MASK, chunk_size=4, return_state=True,
                                       implementation="xla")
  step = jax.jit(gated_linear_step)
  state = jnp.zeros((B, H, K, V), jnp.float32)
  outs = []
  for t in range(L):
    state, out = step(state, q[:, t], k[:, t], v[:, t], g[:, t], key_mask_B=KEY_MASK[:, t])
    outs.append(out)
  np.testing.assert_allclose(jnp.stack(outs, 1), want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(state, final, atol=2e-5, rtol=2e-5)
  # Two calls, the second entered with the first's state, equal one call.
  cut = 5
  first, mid = gated_linear_attention(*(x[:, :cut] for x in (q, k, v, g)), key_mask=KEY_MASK[:, :cut], chunk_size=4,
                                      return_state=True, implementation="xla")
  second = gated_linear_attention(*(x[:, cut:] for x in (q, k, v, g)), key_mask=KEY_MASK[:, cut:], chunk_size=4,
                                  initial_state=mid, implementation="xla")
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), want, atol=2e-5, rtol=2e-5)


def test_bfloat16_inputs_stay_finite_and_close():
  q, k, v, g, _ = _inputs(True, "mixed")
  want = gated_linear_attention(q, k, v, g, implementation="xla", chunk_size=4)
  got = gated_linear_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), g.astype(jnp.bfloat16),
                               implementation="xla", chunk_size=4)
  assert got.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(got, np.float32)))
  assert np.abs(np.asarray(got, np.float32) - want).max() < 0.05 * np.abs(want).max()


def test_bad_inputs_are_one_line_errors():
  q, k, v, g, _ = _inputs(False, "mixed")
  with pytest.raises(ValueError, match=r"log_decay must be \[batch, length, heads\]"):
    gated_linear_attention(q, k, v, g[..., :1])
  with pytest.raises(ValueError, match="unknown gated_linear_attention implementation 'bogus'"):
    gated_linear_attention(q, k, v, g, implementation="bogus")
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    gated_linear_attention(q, k, v, g, segment_ids=SEGMENTS[:, :3])


# ----------------------------------------------------------------------------------------------------------------------
# The Pallas kernels (decay per head): the TPU kernel in interpret mode and the GPU kernel under the GPU interpreter on
# CPU, lowering for tpu and cuda, the reasons elsewhere.


@pytest.mark.parametrize("dtype,per_key,regime", [("float32", False, "mixed"), ("bfloat16", False, "mixed"),
                                                   ("float32", True, "mixed"), ("bfloat16", True, "near0")])
def test_interpret_kernel_matches_the_recurrence(dtype, per_key, regime):
  """The TPU kernels in interpret mode: values and gradients (q, k, v, log_decay) at 21 tokens (a padded last chunk),
  with padding. A decay per head in chunks of 8; a decay per key dimension in chunks of 16 (two 8-row sub-chunks,
  so the off-diagonal sub-chunk factors are exercised), and bfloat16 at decays near 0 (-5 to -30 per token: a
  chunk's log-decay reaches -480, where a factor exp(-b) would overflow)."""
  q, k, v, g, ct = _inputs(per_key, regime, length=21)
  mask = jnp.arange(21)[None] < jnp.array([[15], [21]])
  cast = lambda x: x.astype(dtype)  # noqa: E731
  chunk = 16 if per_key else 8

  @functools.partial(jax.jit, static_argnames="implementation")
  def run(q, k, v, g, implementation):
    f = lambda q, k, v, g: jnp.sum(_entry(q, k, v, g, chunk_size=chunk, key_mask=mask,  # noqa: E731
                                          implementation=implementation).astype(jnp.float32) * ct)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3))(q, k, v, g)

  (want, want_grads), (got, grads) = run(q, k, v, g, "reference"), run(cast(q), cast(k), cast(v), g, "interpret")
  tol = 2e-5 if dtype == "float32" else 5e-2  # bfloat16 operands: relative to each gradient's scale
  np.testing.assert_allclose(got, want, rtol=tol)
  for name, a, b in zip("qkvg", grads, want_grads):
    scale = np.abs(np.asarray(b)).max()
    assert np.abs(np.asarray(a, np.float32) - np.asarray(b)).max() <= tol * max(scale, 1.0), name


def test_gpu_kernel_under_the_gpu_interpreter_matches_the_recurrence():
  """The Mosaic GPU kernel (bfloat16, chunks of 64) under the GPU interpreter: values and gradients (q, k, v,
  log_decay) against the recurrence run in float32 on the same bfloat16-rounded inputs, at 100 tokens (a padded last
  chunk, the state carried into the second chunk), with key padding in the middle of the row and two 64-wide value
  blocks (in the dQ call the key and value dims swap). Tolerance 2e-2 of each tensor's largest magnitude: the kernel
  rounds the decayed `[C, C]` scores, the decayed values and the carried state to bfloat16 where they feed a matmul,
  and its output (and the three backward calls' outputs) are bfloat16. (In float32, which the GPU interpreter also
  runs but wgmma does not take, the same kernel agrees to ~1e-6.)"""
  length, value_dim = 100, 128
  ks = jax.random.split(jax.random.key(7), 5)
  q, k = (jax.random.normal(x, (1, length, 1, 64)).astype(jnp.bfloat16) for x in ks[:2])
  v = jax.random.normal(ks[2], (1, length, 1, value_dim)).astype(jnp.bfloat16)
  g = jax.random.uniform(ks[3], (1, length, 1), minval=-1.0, maxval=0.0)
  ct = jax.random.normal(ks[4], (1, length, 1, value_dim))
  mask = (jnp.arange(length) % 50 < 40)[None]  # tokens 40-49 and 90-99 are padding

  def loss(fn):
    def f(q, k, v, g):
      out = fn(q, *mask_tokens(k, g, mask), v)
      return jnp.sum(out.astype(jnp.float32) * ct), out
    return f

  ref = lambda q, k, g, v: gated_linear_reference(*(x.astype(jnp.float32) for x in (q, k, v)), g)[0]  # noqa: E731
  gpu = lambda q, k, g, v: gated_linear_pallas(q, k, v, g, chunk_size=64, backend="gpu", interpret=True)  # noqa: E731
  # Jitted (run eagerly, the GPU interpreter's driver compiles each small op on its own).
  both = jax.jit(lambda *a: [jax.value_and_grad(loss(f), argnums=(0, 1, 2, 3), has_aux=True)(*a) for f in (ref, gpu)])
  ((_, want), want_grads), ((_, got), grads) = both(q, k, v, g)
  assert got.dtype == jnp.bfloat16
  for name, a, b in [("out", got, want)] + list(zip("qkvg", grads, want_grads)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)) and np.abs(a - b).max() <= 2e-2 * np.abs(b).max(), name
  # The padded tokens are dropped: their k gets no gradient, nor their decays (they neither write nor decay).
  pad = ~np.asarray(mask[0])
  assert not np.any(np.asarray(grads[1], np.float32)[0, pad]) and not np.any(np.asarray(grads[3])[0, pad])


@pytest.mark.export
def test_the_kernels_lower_for_tpu_and_cuda_and_float32_on_cuda_takes_the_logged_xla_form(caplog):
  spec = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
  g_spec = jax.ShapeDtypeStruct((2, 256, 2), jnp.float32)

  def loss(q, k, v, g):
    return jnp.sum(_entry(q, k, v, g).astype(jnp.float32))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  kernels = ("gated_linear_fwd", "gated_linear_bwd_dq", "gated_linear_bwd_dk", "gated_linear_bwd_dv")
  tpu = jax.export.export(step, platforms=["tpu"], disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(spec, spec, spec, g_spec).mlir_module()
  cuda = jax.export.export(step, platforms=["cuda"])(spec, spec, spec, g_spec).mlir_module()
  for module, call in ((tpu, "tpu_custom_call"), (cuda, "mosaic_gpu")):
    assert call in module
    for kernel in kernels:
      assert kernel in module, kernel
  assert "mosaic_gpu" not in tpu and "tpu_custom_call" not in cuda
  # A decay per key dimension (GLA): the TPU kernel (forward and the three backward calls); cuda takes the XLA form.
  per_key = jax.ShapeDtypeStruct(spec.shape, jnp.float32)
  tpu = jax.export.export(step, platforms=["tpu"], disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(spec, spec, spec, per_key).mlir_module()
  assert all(kernel in tpu for kernel in kernels)
  f32 = jax.ShapeDtypeStruct(spec.shape, jnp.float32)
  with caplog.at_level("WARNING", logger="kernels"):
    cuda = jax.export.export(step, platforms=["cuda"])(f32, f32, f32, g_spec).mlir_module()
  assert "mosaic_gpu" not in cuda
  from kernels import platform  # pylint: disable=import-outside-toplevel
  assert any(key[:2] == ("gated_linear_attention", "cuda") and "bfloat16/float16" in key[2]
             for key in platform._logged)  # pylint: disable=protected-access  (logged once per process)
  with pytest.raises(platform.KernelUnavailableError, match="no Pallas kernel for this platform"):
    jax.jit(lambda *a: _entry(*a, implementation="pallas"))(*(jnp.ones(s.shape, s.dtype)
                                                              for s in (spec, spec, spec, g_spec)))


def test_gpu_constraints_are_one_line_errors():
  shape, g_shape = (1, 128, 2, 64), (1, 128, 2)
  ok = dict(segment_ids=False, initial_state=False, return_state=False)
  check_supported(shape, shape, g_shape, jnp.bfloat16, 64, "gpu", **ok)
  check_supported(shape, shape, g_shape, jnp.bfloat16, 128, "gpu", **ok)
  with pytest.raises(ValueError, match="bfloat16/float16"):
    check_supported(shape, shape, g_shape, jnp.float32, 64, "gpu", **ok)
  with pytest.raises(ValueError, match="chunk=32 must be a multiple of 64 on GPU"):
    check_supported(shape, shape, g_shape, jnp.bfloat16, 32, "gpu", **ok)
  with pytest.raises(ValueError, match="value dim=96 must be 64 or 128 on GPU"):
    check_supported(shape, (1, 128, 2, 96), g_shape, jnp.bfloat16, 64, "gpu", **ok)
  with pytest.raises(ValueError, match="shared memory"):  # 247 888 bytes, as Mosaic GPU's lowering counts them
    check_supported((1, 128, 2, 128), (1, 128, 2, 128), g_shape, jnp.bfloat16, 128, "gpu", **ok)


def test_the_entry_checks_a_kernel_call_once_and_the_driver_not_again():
  """Issue 36: the entry checks the call once (its per-backend answers) and runs the kernel through
  `gated_linear_kernel`, which does not re-check (the checking `gated_linear_pallas` is for direct callers)."""
  from unittest import mock  # pylint: disable=import-outside-toplevel

  import kernels.gated_linear as entry  # pylint: disable=import-outside-toplevel
  from kernels.gated_linear import pallas as driver  # pylint: disable=import-outside-toplevel
  q = k = v = jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32)
  g = jax.ShapeDtypeStruct((1, 16, 2), jnp.float32)
  with mock.patch.object(entry, "check_supported", wraps=entry.check_supported) as checks, \
       mock.patch.object(driver, "check_supported", side_effect=AssertionError("the driver re-checked")):
    jax.eval_shape(lambda *a: _entry(*a, chunk_size=8, implementation="interpret"), q, k, v, g)
  assert checks.call_count == 1
