"""kernels.linear_attention's Pallas kernels against the quadratic reference (values and gradients) on CPU: the TPU
kernels in interpret mode (and once under the TPU interpreter's race detector), the Mosaic GPU kernels under the GPU
interpreter. Plus validation and the choice at lowering time (implementation=None and "pallas", exported for cuda/tpu
from this CPU host). Lowering at realistic sizes: `test_lowering.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import logging
import re

import attention
from kernels import linear_attention, platform
from kernels.linear_attention import (ChunkSizes, KernelPlan, check_supported, linear_attention_pallas,
                                      linear_attention_reference, plan)
from kernels.linear_attention.pallas import feature_blocked
from kernels.linear_attention.tables import feature_block, padded_features

# Relative to the largest magnitude of the compared tensor (elementwise relative error is meaningless where terms
# cancel). float32: summation order only. bfloat16: the kernels round the intra-chunk scores and the carried state
# to bfloat16 where they feed a matmul (the reference keeps float32) and the outputs are bfloat16: ~1e-2.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(length, features, head_dim, dtype, b=2, h=2, seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  q = jax.nn.elu(jax.random.normal(k1, (b, length, h, features))) + 1
  k = jax.nn.elu(jax.random.normal(k2, (b, length, h, features))) + 1
  v = jax.random.normal(k3, (b, length, h, head_dim))
  ct = jax.random.normal(k4, (b, length, h, head_dim))
  return [x.astype(dtype) for x in (q, k, v, ct)]


def _assert_close(got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(float(np.max(np.abs(want))), 1.0)
  np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=TOL[dtype])


def _compare(length, chunk, features, head_dim, causal, normalize, dtype, *, backend="tpu", b=2, h=2):
  q, k, v, ct = _inputs(length, features, head_dim, dtype, b=b, h=h)

  def value_and_grads(q, k, v):
    def loss(fn):
      def f(q, k, v):
        out = fn(q, k, v)
        return jnp.sum((out * ct).astype(jnp.float32)), out
      return f
    ref = lambda q, k, v: linear_attention_reference(q, k, v, causal=causal, normalize=normalize)  # noqa: E731
    planned = plan(q.shape, v.shape, dtype, ChunkSizes(chunk), backend)
    kernel = lambda q, k, v: linear_attention_pallas(  # noqa: E731
        q, k, v, plan=planned, causal=causal, normalize=normalize, interpret=True)
    return [jax.value_and_grad(loss(fn), argnums=(0, 1, 2), has_aux=True)(q, k, v) for fn in (ref, kernel)]

  # Jitted for both backends (run eagerly, the GPU interpreter's driver compiles each small op on its own).
  ((_, want), want_grads), ((_, got), got_grads) = jax.jit(value_and_grads)(q, k, v)
  assert got.dtype == dtype
  _assert_close(got, want, dtype)
  for g, w in zip(got_grads, want_grads):
    _assert_close(g, w, dtype)


# The normalized kernels, causal and not; the unnormalized ones (normalize=False: no normalizer inputs/outputs) run
# in both causal forms under `test_feature_blocks_match_the_reference_in_float32` (the feature blocking calls them).
TPU_GRID = [  # (length, chunk, features, head_dim, causal, normalize, dtype)
    (40, 16, 32, 32, True, True, jnp.bfloat16),  # 3 chunks, the length padded to a multiple of the chunk
    (40, 16, 16, 128, False, True, jnp.float32),
]


@pytest.mark.parametrize("length,chunk,features,head_dim,causal,normalize,dtype", TPU_GRID)
def test_tpu_kernels_in_interpret_mode_match_reference(length, chunk, features, head_dim, causal, normalize, dtype):
  _compare(length, chunk, features, head_dim, causal, normalize, dtype)


GPU_GRID = [  # Mosaic GPU kernels: bfloat16, chunk 64, feature/value dims 64 or 128 (128 = two 64-wide blocks)
    # 100 features: no wgmma width divides them (based's Taylor map has 273), zero-padded to 128 (two 64-wide blocks
    # in the dQ and dK kernels, as 128 would be).
    (128, 100, 64, True, True),
    (64, 64, 128, True, False),
    # Non-causal, 100 tokens padded to two chunks, head_dim 128, and performer's default of 256 features: two 128-wide
    # feature blocks as extra heads, normalizer from XLA (both causal forms of the blocking in float32 below, on the
    # TPU kernels). One case (was 100 x 64 features and 64 tokens x 256 features: one compilation fewer).
    (100, 256, 128, False, True),
]


@pytest.mark.parametrize("length,features,head_dim,causal,normalize", GPU_GRID)
def test_gpu_kernels_in_gpu_interpret_mode_match_reference(length, features, head_dim, causal, normalize):
  _compare(length, 64, features, head_dim, causal, normalize, jnp.bfloat16, backend="gpu", b=1, h=1)


@pytest.mark.parametrize("causal", [True, False])
def test_feature_blocks_match_the_reference_in_float32(causal):
  """The feature blocking the GPU driver applies to wide feature maps (`feature_blocked`), on the TPU kernels in
  interpret mode: values and gradients at the float32 tolerance (the numerators are the unnormalized kernel's, the
  normalizer is XLA's)."""
  q, k, v, ct = _inputs(24, 16, 8, jnp.float32, b=1, h=1)

  def losses(q, k, v):
    def loss(fn):
      return lambda q, k, v: jnp.sum(fn(q, k, v) * ct)
    ref = lambda q, k, v: linear_attention_reference(q, k, v, causal=causal)  # noqa: E731
    two_blocks = KernelPlan(backend="tpu", chunk=8, features=16, block=8)
    blocked = lambda q, k, v: feature_blocked(q, k, v, plan=two_blocks, causal=causal, interpret=True)  # noqa: E731
    return [jax.value_and_grad(loss(fn), argnums=(0, 1, 2))(q, k, v) for fn in (ref, blocked)]

  (want, want_grads), (got, got_grads) = jax.jit(losses)(q, k, v)
  _assert_close(got, want, jnp.float32)
  for g, w in zip(got_grads, want_grads):
    _assert_close(g, w, jnp.float32)


def test_tpu_kernels_are_race_free_under_the_tpu_interpreter():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # noqa: PLC0415
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  q, k, v, _ = _inputs(32, 16, 32, jnp.float32, b=1, h=1)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  # Causal: the kernels whose correctness rests on the carried state and the sequential chunk axis.
  planned = plan(q.shape, v.shape, q.dtype, ChunkSizes(16), "tpu")
  f = lambda q, k, v: linear_attention_pallas(q, k, v, plan=planned, causal=True, interpret=params)  # noqa: E731
  # Jitted: the interpreter's callbacks run when the program does (eagerly, the driver's ops compiled one by one).
  got, grads = jax.block_until_ready(jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))(
      q, k, v))
  assert not tpu_interpreter.races.races_found
  want, want_grads = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(linear_attention_reference(*a, causal=True) ** 2),
                                                argnums=(0, 1, 2)))(q, k, v)
  _assert_close(got, want, jnp.float32)
  for g, w in zip(grads, want_grads):
    _assert_close(g, w, jnp.float32)


def test_constraints_are_validated():
  shape = (1, 128, 2, 64)
  with pytest.raises(ValueError, match="chunk=12 must be a multiple of 8 on TPU"):
    check_supported(shape, shape, jnp.float32, 12, "tpu")
  with pytest.raises(ValueError, match="head_dim=192 must be <= 128 or a multiple of 128 on TPU"):
    check_supported(shape, (1, 128, 2, 192), jnp.float32, 64, "tpu")
  with pytest.raises(ValueError, match="chunk=32 must be a multiple of 64 on GPU"):
    check_supported(shape, shape, jnp.bfloat16, 32, "gpu")
  for features in (32, 273):  # zero-padded to a multiple of 64 on GPU (as they are; TPU takes any width)
    check_supported((1, 128, 2, features), shape, jnp.bfloat16, 64, "gpu")
  assert [padded_features(f, "gpu") for f in (32, 64, 100, 273)] == [64, 64, 128, 320]
  assert padded_features(273, "tpu") == 273
  with pytest.raises(ValueError, match="features=32 must be 64, 128 or a multiple of 64 on GPU"):
    feature_block(32, "gpu")
  with pytest.raises(ValueError, match="head_dim=256 must be 64 or 128 on GPU"):
    check_supported(shape, (1, 128, 2, 256), jnp.bfloat16, 64, "gpu")
  check_supported((1, 128, 2, 256), shape, jnp.bfloat16, 64, "gpu")  # performer's default: two 128-wide blocks
  assert [feature_block(f, "gpu") for f in (64, 128, 192, 256)] == [64, 128, 64, 128]
  # The one plan per call: based's 273 Taylor features run as 320 in five 64-wide blocks on GPU, whole on TPU.
  assert plan((1, 128, 2, 273), shape, jnp.bfloat16, ChunkSizes(), "gpu") == KernelPlan("gpu", 64, 320, 64)
  assert plan((1, 128, 2, 273), shape, jnp.bfloat16, ChunkSizes(), "tpu") == KernelPlan("tpu", 128, 273, 273)
  assert feature_block(256, "tpu") == 256
  with pytest.raises(ValueError, match="dtype=float32: the Mosaic GPU kernels take only bfloat16/float16"):
    check_supported(shape, shape, jnp.float32, 64, "gpu")
  with pytest.raises(ValueError, match="chunk must be a positive integer, got chunk=0"):
    ChunkSizes(0).resolve("tpu")
  assert ChunkSizes().resolve("tpu") == 128 and ChunkSizes().resolve("gpu") == 64
  q, k, v, _ = _inputs(16, 8, 8, jnp.float32)
  with pytest.raises(ValueError, match="chunk=4 must be a multiple of 8 on TPU"):
    linear_attention(q, k, v, causal=True, chunk_size=4, implementation="interpret")


def _uses_pallas(fn, *args) -> bool:
  """Whether tracing `fn` reaches a Pallas kernel: `pallas_call` (TPU kernels) or `mpmd_map` (Mosaic GPU kernels)."""
  jaxpr = str(jax.make_jaxpr(lambda *a: fn(*a))(*args))
  return "pallas_call" in jaxpr or "mpmd_map" in jaxpr


TARGETS = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}


def _grad(fn):
  """`jit(grad)` of `fn`'s float32 sum: exporting the same jitted function for several platforms traces it once (the
  trace, staging every platform's kernels, is the bulk of an export's cost; each platform is still lowered)."""
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))  # noqa: E731
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _lowered(fn, platform_name, *args, jitted=None) -> str:
  """The StableHLO text of `jax.grad` of `fn` exported for `platform_name` (nothing runs); `jitted`: a `_grad(fn)`
  shared between calls."""
  exported = jax.export.export(
      jitted or _grad(fn), platforms=[platform_name],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in TARGETS.values()])(*args)
  return exported.mlir_module()


def _custom_calls(module: str) -> set[str]:
  return set(re.findall(r"custom_call @(\w+)\(", module))


def test_default_implementation_is_chosen_where_the_program_is_lowered(caplog):
  """implementation=None: the cuda/tpu programs hold the kernels (forward and backward), the CPU program none, and
  nothing is logged for a call every kernel can serve. Causal (non-causal calls: `test_wide_feature_maps_...`'s
  (False, 256) on cuda, `test_lowering.py` on both)."""
  causal = True
  spec = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
  f = lambda q, k, v: linear_attention(q, k, v, causal=causal)  # noqa: E731
  jitted = _grad(f)  # one trace, lowered for each platform
  with caplog.at_level(logging.WARNING, logger="kernels"):
    for name, target in TARGETS.items():
      module = _lowered(f, name, spec, spec, spec, jitted=jitted)
      assert _custom_calls(module) == {target}, name
      assert re.search(r"linear_attention_fwd", module) and re.search(r"linear_attention_bwd", module), name
    assert not _custom_calls(_lowered(f, "cpu", spec, spec, spec, jitted=jitted))
  assert not [r for r in caplog.records if "linear_attention" in r.getMessage()]


# (True, 256) dropped: the causal blocking is (True, 273)'s, 128-wide blocks (False, 256)'s.
@pytest.mark.parametrize("causal,features", [(False, 256), (True, 273)])
def test_wide_feature_maps_reach_the_gpu_kernel(causal, features, caplog):
  """Performer's registry default of 256 random features runs as 128-wide feature blocks in the Mosaic GPU kernels
  (forward and backward), and based's 273 Taylor features as 320 (zero-padded: five 64-wide blocks), with nothing
  logged."""
  qk = jax.ShapeDtypeStruct((1, 128, 2, features), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
  f = lambda q, k, v: linear_attention(q, k, v, causal=causal)  # noqa: E731
  platform._logged.clear()  # noqa: SLF001
  with caplog.at_level(logging.WARNING, logger="kernels"):
    module = _lowered(f, "cuda", qk, qk, v)
  assert _custom_calls(module) == {"mosaic_gpu_v2"}
  assert re.search(r"linear_attention_fwd", module) and re.search(r"linear_attention_bwd", module)
  assert not [r for r in caplog.records if "linear_attention" in r.getMessage()]


def test_a_call_the_gpu_kernel_cannot_serve_falls_back_on_cuda_only_and_says_why(caplog):
  spec = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.float32)  # Mosaic GPU takes only bfloat16/float16
  f = lambda q, k, v: linear_attention(q, k, v, causal=True)  # noqa: E731
  platform._logged.clear()  # noqa: SLF001  (other tests may have logged this reason already)
  jitted = _grad(f)  # one trace for cpu, tpu and the first cuda lowering; the second cuda export traces anew
  with caplog.at_level(logging.WARNING, logger="kernels"):
    assert not _custom_calls(_lowered(f, "cpu", spec, spec, spec, jitted=jitted))
    assert _custom_calls(_lowered(f, "tpu", spec, spec, spec, jitted=jitted)) == {"tpu_custom_call"}
    assert not caplog.records  # lowering for CPU and TPU says nothing about the GPU's constraints
    assert not _custom_calls(_lowered(f, "cuda", spec, spec, spec, jitted=jitted))
    _lowered(f, "cuda", spec, spec, spec)  # once per (op, platform, reason), across two traces
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 1, messages
  assert re.match(r"linear_attention: Pallas kernel cannot serve this call on cuda \(dtype=float32: .*"
                  r"bfloat16.*\); using xla$", messages[0]), messages[0]


def test_explicit_pallas_never_falls_back():
  bf16 = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
  f32 = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.float32)
  f = lambda q, k, v: linear_attention(q, k, v, causal=True, implementation="pallas")  # noqa: E731
  jitted = _grad(f)  # one trace per dtype, lowered for each platform
  assert _custom_calls(_lowered(f, "cuda", bf16, bf16, bf16, jitted=jitted)) == {"mosaic_gpu_v2"}
  assert _custom_calls(_lowered(f, "tpu", f32, f32, f32, jitted=jitted)) == {"tpu_custom_call"}
  with pytest.raises(ValueError, match=r"implementation='pallas' cannot run on cuda: dtype=float32: .*bfloat16"):
    _lowered(f, "cuda", f32, f32, f32, jitted=jitted)
  with pytest.raises(ValueError, match=r"implementation='pallas' cannot run on cpu: .*implementation='interpret'"):
    _lowered(f, "cpu", bf16, bf16, bf16, jitted=jitted)
  chunk32 = lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=12, implementation="pallas")  # noqa
  with pytest.raises(ValueError, match=r"no kernel for this call \(tpu: chunk=12 must be a multiple of 8"):
    _lowered(chunk32, "tpu", bf16, bf16, bf16)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_layer_implementation_option_reaches_the_kernel(implementation):
  x = jnp.ones((1, 24, 32))
  layer = attention.build("linear", num_heads=2, causal=True, chunk_size=16, implementation=implementation)
  params = jax.eval_shape(layer.init, jax.random.key(1), x)
  assert _uses_pallas(layer.apply, params, x) == (implementation == "interpret")


def test_one_plan_per_call(monkeypatch):
  """The entry plans each call once per backend (`tables.plan`); the driver follows the plan and checks nothing again,
  based's 273 features (padded, then feature-blocked on GPU) included."""
  from kernels.linear_attention import tables  # noqa: PLC0415
  checked = []
  real = tables.check_supported
  monkeypatch.setattr(tables, "check_supported", lambda *a: checked.append(a[-1]) or real(*a))
  qk = jax.ShapeDtypeStruct((1, 128, 1, 273), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
  jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(linear_attention(q, k, v, causal=True).astype(jnp.float32)),
                          argnums=(0, 1, 2)))(qk, qk, v)
  assert sorted(checked) == ["gpu", "tpu"]
