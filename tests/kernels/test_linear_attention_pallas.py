"""kernels.linear_attention_pallas: the chunked Pallas kernels against the quadratic reference (values and gradients)
on CPU: the TPU kernels in interpret mode (and once under the TPU interpreter's race detector), the Mosaic GPU
kernels under the GPU interpreter. Plus validation and dispatch. Lowering at realistic sizes: `test_lowering.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from kernels import linear_attention
from kernels.linear_attention import linear_attention_reference
from kernels import linear_attention_pallas as linear_attention_pallas_module
from kernels.linear_attention_pallas import ChunkSizes, check_supported, linear_attention_pallas

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
    kernel = lambda q, k, v: linear_attention_pallas(  # noqa: E731
        q, k, v, causal=causal, normalize=normalize, chunk_sizes=ChunkSizes(chunk), backend=backend, interpret=True)
    return [jax.value_and_grad(loss(fn), argnums=(0, 1, 2), has_aux=True)(q, k, v) for fn in (ref, kernel)]

  run = value_and_grads if backend == "gpu" else jax.jit(value_and_grads)
  ((_, want), want_grads), ((_, got), got_grads) = run(q, k, v)
  assert got.dtype == dtype
  _assert_close(got, want, dtype)
  for g, w in zip(got_grads, want_grads):
    _assert_close(g, w, dtype)


TPU_GRID = [  # (length, chunk, features, head_dim, causal, normalize, dtype)
    (64, 16, 32, 32, True, True, jnp.float32),
    (100, 32, 16, 64, True, False, jnp.float32),  # length padded to a multiple of the chunk
    (64, 32, 32, 128, False, True, jnp.float32),
    (48, 16, 64, 32, False, False, jnp.float32),
    (128, 64, 64, 64, True, True, jnp.bfloat16),
    (96, 32, 32, 128, False, True, jnp.bfloat16),
]


@pytest.mark.parametrize("length,chunk,features,head_dim,causal,normalize,dtype", TPU_GRID)
def test_tpu_kernels_in_interpret_mode_match_reference(length, chunk, features, head_dim, causal, normalize, dtype):
  _compare(length, chunk, features, head_dim, causal, normalize, dtype)


GPU_GRID = [  # Mosaic GPU kernels: bfloat16, chunk 64, feature/value dims 64 or 128 (128 = two 64-wide blocks)
    (128, 128, 64, True, True),
    (64, 64, 128, True, False),
    (100, 64, 128, False, True),
]


@pytest.mark.parametrize("length,features,head_dim,causal,normalize", GPU_GRID)
def test_gpu_kernels_in_gpu_interpret_mode_match_reference(length, features, head_dim, causal, normalize):
  _compare(length, 64, features, head_dim, causal, normalize, jnp.bfloat16, backend="gpu", b=1, h=1)


def test_tpu_kernels_are_race_free_under_the_tpu_interpreter():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # noqa: PLC0415
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  q, k, v, _ = _inputs(32, 16, 32, jnp.float32, b=1, h=1)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  # Causal: the kernels whose correctness rests on the carried state and the sequential chunk axis.
  f = lambda q, k, v: linear_attention_pallas(q, k, v, causal=True, chunk_sizes=ChunkSizes(16),  # noqa: E731
                                              interpret=params)
  got, grads = jax.value_and_grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  assert not tpu_interpreter.races.races_found
  want, want_grads = jax.value_and_grad(lambda *a: jnp.sum(linear_attention_reference(*a, causal=True) ** 2),
                                        argnums=(0, 1, 2))(q, k, v)
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
  with pytest.raises(ValueError, match="features=32 must be 64 or 128 on GPU"):
    check_supported((1, 128, 2, 32), shape, jnp.bfloat16, 64, "gpu")
  with pytest.raises(ValueError, match="dtype=float32 is not supported by the GPU kernel"):
    check_supported(shape, shape, jnp.float32, 64, "gpu")
  with pytest.raises(ValueError, match="chunk must be a positive integer, got chunk=0"):
    ChunkSizes(0).resolve("tpu")
  assert ChunkSizes().resolve("tpu") == 128 and ChunkSizes().resolve("gpu") == 64
  q, k, v, _ = _inputs(16, 8, 8, jnp.float32)
  with pytest.raises(ValueError, match="chunk=4 must be a multiple of 8 on TPU"):
    linear_attention(q, k, v, causal=True, chunk_size=4, implementation="interpret")


def _uses_pallas(fn, *args) -> bool:
  """Whether tracing `fn` reaches a Pallas kernel: `pallas_call` (TPU kernels) or `mpmd_map` (Mosaic GPU kernels)."""
  # A fresh function each time: make_jaxpr caches traces per function, and the dispatch happens while tracing.
  jaxpr = str(jax.make_jaxpr(lambda *a: fn(*a))(*args))
  return "pallas_call" in jaxpr or "mpmd_map" in jaxpr


def test_default_implementation_is_the_kernel_on_accelerators_and_xla_on_cpu(monkeypatch):
  q, k, v, _ = _inputs(128, 64, 64, jnp.bfloat16)
  f = lambda q, k, v: linear_attention(q, k, v, causal=True)  # noqa: E731
  assert jax.default_backend() == "cpu" and not _uses_pallas(f, q, k, v)
  monkeypatch.setattr(linear_attention_pallas_module, "accelerator_backend", lambda: "gpu")
  assert _uses_pallas(f, q, k, v)
  # Outside the GPU kernel's reach (float32, a 32-wide chunk), None falls back to xla.
  assert not _uses_pallas(f, *(x.astype(jnp.float32) for x in (q, k, v)))
  assert not _uses_pallas(lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=32), q, k, v)
  monkeypatch.setattr(linear_attention_pallas_module, "accelerator_backend", lambda: "tpu")
  assert _uses_pallas(f, *(x.astype(jnp.float32) for x in (q, k, v)))


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_layer_implementation_option_reaches_the_kernel(implementation):
  x = jnp.ones((1, 24, 32))
  layer = attention.build("linear", num_heads=2, causal=True, chunk_size=16, implementation=implementation)
  params = jax.eval_shape(layer.init, jax.random.key(1), x)
  assert _uses_pallas(layer.apply, params, x) == (implementation == "interpret")
