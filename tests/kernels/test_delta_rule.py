"""`kernels.delta_rule` against its token-by-token recurrence: values and gradients of the chunked (WY / UT) XLA form
with chunk sizes that do not divide the length, key padding, packed segments, beta at 0, at 1 and between, no decay
(DeltaNet) and decays near 0 and near 1 (Gated DeltaNet); float32 against a float64 recurrence; decode steps; carried
states; bfloat16; errors. The Pallas kernels (the TPU kernels in interpret mode) against the recurrence: values and
gradients with and without decay, key padding, a chunk that does not divide the length; bfloat16 inputs; calls the
kernel cannot serve; their tpu lowering (jax.export). Tolerances: float32 2e-5 (absolute on O(1) values); bfloat16
0.05 of the output's scale."""

from __future__ import annotations

import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.delta_rule import delta_rule_reference, delta_rule_step
from kernels.delta_rule import delta_rule_attention as _entry
from kernels.delta_rule import delta_rule_pallas, mask_tokens
from kernels.platform import KernelUnavailableError

B, L, H, K, V = 2, 11, 2, 4, 3
SEGMENTS = jnp.array([[0] * 4 + [1] * 7, [0] * 2 + [3] * 5 + [7] * 4])
KEY_MASK = jnp.arange(L)[None] < jnp.array([[8], [L]])
DECAYS = {"none": None, "near0": (-30.0, -5.0), "near1": (-1e-4, -1e-5)}
BETAS = {"zero": (0.0, 0.0), "one": (1.0, 1.0), "mixed": (0.0, 1.0)}
delta_rule_attention = jax.jit(_entry, static_argnames=("chunk_size", "return_state", "implementation"))


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(decay: str, beta: str = "mixed", seed: int = 0, length: int = L):
  ks = jax.random.split(jax.random.key(seed), 6)
  q, k = (_unit(jax.random.normal(x, (B, length, H, K))) for x in ks[:2])
  v = jax.random.normal(ks[2], (B, length, H, V))
  b = jax.random.uniform(ks[3], (B, length, H), minval=BETAS[beta][0], maxval=BETAS[beta][1])
  g = None if DECAYS[decay] is None else jax.random.uniform(ks[4], (B, length, H), minval=DECAYS[decay][0],
                                                            maxval=DECAYS[decay][1])
  return q, k, v, b, g, jax.random.normal(ks[5], (B, length, H, V))


@functools.partial(jax.jit, static_argnames=("implementation", "chunk_size"))
def _value_and_grads(q, k, v, b, g, ct, *, implementation, chunk_size):
  def f(q, k, v, b, g):
    out = _entry(q, k, v, b, g, chunk_size=chunk_size, key_mask=KEY_MASK, segment_ids=SEGMENTS,
                 implementation=implementation)
    return jnp.sum(out * ct), out
  argnums = (0, 1, 2, 3) if g is None else (0, 1, 2, 3, 4)
  (_, out), grads = jax.value_and_grad(f, argnums=argnums, has_aux=True)(q, k, v, b, g)
  return out, grads


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("beta", list(BETAS))
def test_xla_matches_the_recurrence(decay, beta):
  q, k, v, b, g, ct = _inputs(decay, beta)
  want, want_grads = _value_and_grads(q, k, v, b, g, ct, implementation="reference", chunk_size=1)
  for chunk_size in (3, 16):  # 3 does not divide 11; 16 is longer than the sequence
    got, grads = _value_and_grads(q, k, v, b, g, ct, implementation="xla", chunk_size=chunk_size)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=f"chunk={chunk_size}")
    for name, x, y in zip(("q", "k", "v", "beta", "log_decay"), grads, want_grads):
      np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-5, err_msg=f"chunk={chunk_size} d{name}")
  if beta == "zero":  # nothing is ever written
    np.testing.assert_array_equal(np.asarray(got), 0.0)


def test_padding_and_segments_act():
  q, k, v, b, g, _ = _inputs("near1")
  hole = jnp.ones((B, L), bool).at[:, 3:5].set(False)  # padding in the middle: later tokens would read it
  noise = 5.0 * (~hole)[:, :, None, None]
  xla_form = functools.partial(_entry, implementation="xla", chunk_size=3)

  @jax.jit  # one compiled program for the five calls (four separately: ~1 CPU-s more)
  def outputs(q, k, v, b, g):
    return (xla_form(q, k, v, b, g, key_mask=hole), xla_form(q, k + noise, v + noise, b, g, key_mask=hole),
            xla_form(q, k + noise, v + noise, b, g), xla_form(q, k, v, b, g, segment_ids=SEGMENTS),
            xla_form(q[:, 4:], k[:, 4:], v[:, 4:], b[:, 4:], g[:, 4:]))

  out, noisy_masked, noisy_unmasked, packed, alone = outputs(q, k, v, b, g)
  np.testing.assert_allclose(noisy_masked[:, 5:], out[:, 5:], atol=1e-5)
  assert not np.allclose(noisy_unmasked[:, 5:], out[:, 5:])
  np.testing.assert_allclose(packed[0, 4:], alone[0], atol=1e-5)


@pytest.mark.parametrize("decay", ["none", "near1"])
def test_float32_against_a_float64_recurrence(decay):
  """Relative error below 1e-5 (of the output's largest magnitude) at 512 tokens; 4K: scripts/benchmark_gated.py."""
  q, k, v, b, g, _ = _inputs(decay, seed=3, length=512)
  got = jax.jit(lambda *a: _entry(*a, implementation="xla"))(q, k, v, b, g)
  with jax.enable_x64(True):
    args = [None if x is None else np.asarray(x, np.float64) for x in (q, k, v, b, g)]
    want = np.asarray(jax.jit(delta_rule_reference)(*args)[0])
  assert want.dtype == np.float64
  error = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
  assert error < 1e-5, error


@pytest.mark.parametrize("decay", ["none", "near1"])
def test_decode_steps_and_carried_states_equal_the_parallel_output(decay):
  q, k, v, b, g, _ = _inputs(decay)
  want, final = delta_rule_attention(q, k, v, b, g, key_mask=KEY_MASK, chunk_size=4, return_state=True,
                                     implementation="xla")
  step = jax.jit(delta_rule_step)
  state = jnp.zeros((B, H, K, V), jnp.float32)
  outs = []
  for t in range(L):
    state, out = step(state, q[:, t], k[:, t], v[:, t], b[:, t], None if g is None else g[:, t],
                      key_mask_B=KEY_MASK[:, t])
    outs.append(out)
  np.testing.assert_allclose(jnp.stack(outs, 1), want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(state, final, atol=2e-5, rtol=2e-5)
  cut = 5
  part = lambda x, s: None if x is None else x[:, s]  # noqa: E731
  first, mid = delta_rule_attention(*(part(x, slice(cut)) for x in (q, k, v, b, g)), key_mask=KEY_MASK[:, :cut],
                                    chunk_size=4, return_state=True, implementation="xla")
  second = delta_rule_attention(*(part(x, slice(cut, None)) for x in (q, k, v, b, g)), key_mask=KEY_MASK[:, cut:],
                                chunk_size=4, initial_state=mid, implementation="xla")
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), want, atol=2e-5, rtol=2e-5)


def test_bfloat16_inputs_stay_finite_and_close():
  q, k, v, b, g, _ = _inputs("near1")
  want = delta_rule_attention(q, k, v, b, g, implementation="xla", chunk_size=4)
  got = delta_rule_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v, b, g)), implementation="xla", chunk_size=4)
  assert got.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(got, np.float32)))
  assert np.abs(np.asarray(got, np.float32) - want).max() < 0.05 * np.abs(want).max()


def test_bad_inputs_are_one_line_errors():
  q, k, v, b, g, _ = _inputs("near1")
  with pytest.raises(ValueError, match=r"beta must be \[batch, length, heads\]"):
    _entry(q, k, v, b[..., :1], g)
  with pytest.raises(ValueError, match="unknown delta_rule_attention implementation 'triton'"):
    _entry(q, k, v, b, g, implementation="triton")
  with pytest.raises(ValueError, match="initial_state must be"):
    _entry(q, k, v, b, g, initial_state=jnp.zeros((B, H, K, K)))


# ----------------------------------------------------------------------------------------------------------------------
# The Pallas kernels (kernels/delta_rule/pallas.py, pallas_tpu.py), in interpret mode on CPU.

KB, KL, KH, KD, KCHUNK = 1, 40, 2, 16, 16  # 16 does not divide 40: the last chunk is padded
KERNEL_MASK = jnp.arange(KL)[None] < 29  # key padding at the end


def _kernel_inputs(decay: str, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(7), 6)
  q, k = (_unit(jax.random.normal(x, (KB, KL, KH, KD))) for x in ks[:2])
  v = jax.random.normal(ks[2], (KB, KL, KH, KD))
  b = jax.random.uniform(ks[3], (KB, KL, KH))
  g = None if decay == "none" else jax.random.uniform(ks[4], (KB, KL, KH), minval=-2.0, maxval=-1e-3)
  cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
  return (*(cast(x) for x in (q, k, v, b, g)), jax.random.normal(ks[5], (KB, KL, KH, KD)))


@functools.partial(jax.jit, static_argnames=("implementation",))
def _kernel_value_and_grads(q, k, v, b, g, ct, s0, ct_state, *, implementation):
  """Output and gradients w.r.t. q, k, v, beta (, log_decay) (, initial state); with `s0` the call starts from that
  state and also returns the final one (its cotangent `ct_state`)."""
  def f(q, k, v, b, g, s0):
    out = _entry(q, k, v, b, g, chunk_size=KCHUNK, key_mask=KERNEL_MASK, initial_state=s0,
                 return_state=s0 is not None, implementation=implementation)
    if s0 is None:
      return jnp.sum(out * ct), out
    return jnp.sum(out[0] * ct) + jnp.sum(out[1] * ct_state), out
  argnums = (0, 1, 2, 3) + (() if g is None else (4,)) + (() if s0 is None else (5,))
  (_, out), grads = jax.value_and_grad(f, argnums=argnums, has_aux=True)(q, k, v, b, g, s0)
  return out, grads


@pytest.mark.parametrize("decay", ["none", "gated"])
def test_interpret_kernel_matches_the_recurrence(decay):
  """DeltaNet from a zero state; Gated DeltaNet from a given state, returning the final one (both differentiated)."""
  q, k, v, b, g, ct = _kernel_inputs(decay)
  s0, ct_state = (None, None) if decay == "none" else (
      jax.random.normal(jax.random.key(9), (2, KB, KH, KD, KD)) * jnp.array([1.0, 0.5])[:, None, None, None, None])
  want, want_grads = _kernel_value_and_grads(q, k, v, b, g, ct, s0, ct_state, implementation="reference")
  got, grads = _kernel_value_and_grads(q, k, v, b, g, ct, s0, ct_state, implementation="interpret")
  for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-5)
  names = ("q", "k", "v", "beta") + (() if g is None else ("log_decay", "initial_state"))
  assert len(grads) == len(names)
  for name, x, y in zip(names, grads, want_grads):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-5, err_msg=f"d{name}")
  # Key padding by gradients: a padded token reaches no real output (nor the final state).
  np.testing.assert_array_equal(np.asarray(grads[2])[0, 29:], 0.0)
  assert np.abs(np.asarray(grads[2])[0, :29]).max() > 0


def test_interpret_kernel_bfloat16_inputs_stay_finite_and_close():
  q, k, v, b, g, _ = _kernel_inputs("gated")
  want = delta_rule_attention(q, k, v, b, g, chunk_size=KCHUNK, key_mask=KERNEL_MASK, implementation="reference")
  got = delta_rule_attention(*_kernel_inputs("gated", jnp.bfloat16)[:5], chunk_size=KCHUNK, key_mask=KERNEL_MASK,
                             implementation="interpret")
  assert got.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(got, np.float32)))
  assert np.abs(np.asarray(got, np.float32) - want).max() < 0.05 * np.abs(want).max()


def test_explicit_pallas_never_falls_back():
  q, k, v, b, g, _ = _kernel_inputs("gated")
  segments = jnp.zeros((KB, KL), jnp.int32)
  with pytest.raises(KernelUnavailableError, match="segment_ids .* are served by the XLA form only"):
    _entry(q, k, v, b, g, chunk_size=KCHUNK, segment_ids=segments, implementation="pallas")
  with pytest.raises(ValueError, match="segment_ids .* are served by the XLA form only"):
    _entry(q, k, v, b, g, chunk_size=KCHUNK, segment_ids=segments, implementation="interpret")
  with pytest.raises(ValueError, match="chunk=12 must be a multiple of 8"):
    _entry(q, k, v, b, g, chunk_size=12, implementation="interpret")


def test_kernels_export_for_tpu_and_unserved_cuda_calls_are_logged(caplog):
  """The forward and backward kernels in a differentiated call lowered for tpu (`implementation=None`); a call the GPU
  kernels cannot serve (chunk 16) holds the XLA form on cuda with the reason logged, and an explicit "pallas" is an
  error there. (The GPU kernels lowered for cuda: tests/kernels/test_export_gated_training_step.py.)"""
  shapes = [jax.ShapeDtypeStruct((1, KL, KH, KD), jnp.bfloat16)] * 3 + [
      jax.ShapeDtypeStruct((1, KL, KH), jnp.bfloat16)] * 2

  def call(implementation):
    return jax.jit(lambda *a: _entry(*a, chunk_size=KCHUNK, implementation=implementation))

  loss = lambda *a: jnp.sum(call(None)(*a).astype(jnp.float32))  # noqa: E731
  module = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=["tpu"])(
      *shapes).mlir_module()
  assert re.findall(r"custom_call @(\w+)\(", module) == ["tpu_custom_call"] * 2
  assert "delta_rule_fwd" in module and "delta_rule_bwd" in module
  with caplog.at_level(logging.WARNING, logger="kernels"):
    module = jax.export.export(call(None), platforms=["cuda"])(*shapes).mlir_module()
  assert "mosaic_gpu" not in module and "delta_rule_fwd" not in module
  from kernels import platform as platform_lib  # pylint: disable=import-outside-toplevel
  assert any(key[:2] == ("delta_rule_attention", "cuda") and "chunk=16 must be 64 on GPU" in key[2]
             for key in platform_lib._logged)  # pylint: disable=protected-access  (logged once per process)
  with pytest.raises(KernelUnavailableError, match="cannot run on cuda: .*chunk=16 must be 64"):
    jax.export.export(call("pallas"), platforms=["cuda"])(*shapes)


def test_gpu_kernels_in_the_gpu_interpreter_match_the_recurrence():
  """The Mosaic GPU kernels (bfloat16 operands, float32 states) under the GPU interpreter: 136 tokens (three chunks of
  64, the last one padded, so the chunk decays' gradient is exercised), key padding, a decay, entered with a state and
  returning the final one. Tolerance: 2e-2 of each quantity's largest magnitude (bfloat16 operands; measured 5e-3)."""
  length, dim = 136, 64
  ks = jax.random.split(jax.random.key(3), 8)
  q, k = (_unit(jax.random.normal(x, (1, length, 1, dim))).astype(jnp.bfloat16) for x in ks[:2])
  v = jax.random.normal(ks[2], (1, length, 1, dim)).astype(jnp.bfloat16)
  b = jax.random.uniform(ks[3], (1, length, 1))
  g = jax.random.uniform(ks[4], (1, length, 1), minval=-1.0, maxval=-1e-3)
  s0, ct_state = (jax.random.normal(x, (1, 1, dim, dim)) for x in ks[6:])
  ct = jax.random.normal(ks[5], (1, length, 1, dim))
  mask = jnp.arange(length)[None] < 120

  def run(core):
    def f(q, k, v, b, g, s0):
      out, final = core(q, k, v, *mask_tokens(b, g, mask), s0)
      return jnp.sum(out.astype(jnp.float32) * ct) + jnp.sum(final * ct_state), (out, final)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))(q, k, v, b, g, s0)

  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731  the reference on the same (rounded) inputs
  (_, want), want_grads = run(lambda q, k, v, b, g, s0: delta_rule_reference(f32(q), f32(k), f32(v), b, g,
                                                                            initial_state=s0))
  (_, got), grads = run(lambda q, k, v, b, g, s0: delta_rule_pallas(
      q, k, v, b, g, chunk_size=64, initial_state=s0, return_state=True, backend="gpu", interpret=True))
  names = ("out", "final state", "dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state")
  for name, x, y in zip(names, (*got, *grads), (*want, *want_grads)):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.abs(x - y).max() < 2e-2 * np.abs(y).max(), name
  assert np.abs(np.asarray(grads[2], np.float32)[0, 120:]).max() == 0.0  # padded values reach nothing


def test_the_entry_checks_a_kernel_call_once_and_the_driver_not_again():
  """Issue 36: the entry checks the call once and runs the kernel through `delta_rule_kernel`, which does not
  re-check (the checking `delta_rule_pallas` is for direct callers)."""
  from unittest import mock  # pylint: disable=import-outside-toplevel

  import kernels.delta_rule as entry  # pylint: disable=import-outside-toplevel
  from kernels.delta_rule import pallas as driver  # pylint: disable=import-outside-toplevel
  q = k = v = jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32)
  beta = jax.ShapeDtypeStruct((1, 16, 2), jnp.float32)
  with mock.patch.object(entry, "check_supported", wraps=entry.check_supported) as checks, \
       mock.patch.object(driver, "check_supported", side_effect=AssertionError("the driver re-checked")):
    jax.eval_shape(lambda *a: _entry(*a, chunk_size=8, implementation="interpret"), q, k, v, beta)
  assert checks.call_count == 1
