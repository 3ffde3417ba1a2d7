"""kernels.linear_attention: reference vs a numpy loop, xla vs reference (values and gradients), decode step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import linear_attention
from kernels.linear_attention import linear_attention_step

# Tolerances per input dtype, relative to the largest magnitude of the compared tensor (elementwise relative error is
# meaningless where terms cancel to ~0). float32: the 1e-5 relative. bfloat16 inputs: both paths accumulate in
# float32 from the same bfloat16 values, so they agree far better than bfloat16 precision; the output is rounded to
# bfloat16 (8 bits of mantissa), hence 1e-2.
TOL = {jnp.float32: dict(rtol=0, atol=1e-5), jnp.bfloat16: dict(rtol=0, atol=1e-2)}


def _inputs(length, dtype=jnp.float32, b=2, h=2, f=8, d=5, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  q = jax.nn.elu(jax.random.normal(k1, (b, length, h, f))) + 1
  k = jax.nn.elu(jax.random.normal(k2, (b, length, h, f))) + 1
  v = jax.random.normal(k3, (b, length, h, d))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _assert_close(got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  # Floored at 1: with a single key, d out / d q is 0 up to rounding.
  scale = max(float(np.max(np.abs(want))), 1.0)
  np.testing.assert_allclose(got / scale, want / scale, **TOL[dtype])


def numpy_linear_attention(q, k, v, causal, normalize, eps=1e-6):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, length, h, _ = q.shape
  out = np.zeros(v.shape)
  for t in range(length):
    s_end = t + 1 if causal else length
    a = np.einsum("bhf,bshf->bhs", q[:, t], k[:, :s_end])
    out[:, t] = np.einsum("bhs,bshd->bhd", a, v[:, :s_end])
    if normalize:
      out[:, t] /= a.sum(-1)[..., None] + eps
  return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_numpy(causal, normalize):
  q, k, v = _inputs(13)
  got = linear_attention(q, k, v, causal=causal, normalize=normalize, implementation="reference")
  np.testing.assert_allclose(got, numpy_linear_attention(q, k, v, causal, normalize), rtol=1e-5, atol=1e-5)


# Lengths: one token in a larger chunk, several chunks with a partial last one, chunk 1; normalize=False (no
# normalizer in the forward or backward) at two of them; bfloat16 once per causal form.
GRID = [(dtype, causal, length, chunk, normalize)
        for causal in (False, True)
        for length, chunk in ((1, 64), (17, 8), (100, 32), (33, 1))
        for normalize in (True, False)
        for dtype in (jnp.float32, jnp.bfloat16)
        if (dtype == jnp.float32 and (normalize or length in (17, 33))) or (normalize and length == 100)]


@pytest.mark.parametrize("dtype,causal,length,chunk_size,normalize", GRID)
def test_xla_matches_reference_values_and_gradients(dtype, causal, length, chunk_size, normalize):
  q, k, v = _inputs(length, dtype)
  kw = dict(causal=causal, normalize=normalize)
  ct = jax.random.normal(jax.random.key(5), v.shape).astype(dtype)

  def value_and_grads(impl, **extra):
    def loss(q, k, v):
      out = linear_attention(q, k, v, implementation=impl, **kw, **extra)
      return jnp.sum((out * ct).astype(jnp.float32)), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  # One compiled program for both implementations.
  ((_, ref), g_ref), ((_, got), g_xla) = jax.jit(
      lambda: (value_and_grads("reference"), value_and_grads("xla", chunk_size=chunk_size)))()
  assert got.dtype == dtype
  _assert_close(got, ref, dtype)
  for a, b in zip(g_xla, g_ref):
    _assert_close(a, b, dtype)


def test_decode_steps_equal_causal_parallel():
  q, k, v = _inputs(11)
  want = linear_attention(q, k, v, causal=True, implementation="reference")
  state = (jnp.zeros((2, 2, 8, 5)), jnp.zeros((2, 2, 8)))
  outs = []
  for t in range(11):
    state, out = linear_attention_step(state, q[:, t], k[:, t], v[:, t])
    outs.append(out)
  np.testing.assert_allclose(jnp.stack(outs, axis=1), want, rtol=1e-5, atol=1e-6)


def test_errors():
  q, k, v = _inputs(8)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="implementation='pallas' cannot run on cpu: no Pallas kernel"):
      linear_attention(q, k, v, causal=True, implementation="pallas")
  with pytest.raises(ValueError, match="unknown linear_attention implementation 'cuda'"):
    linear_attention(q, k, v, causal=True, implementation="cuda")
  with pytest.raises(ValueError, match="chunk_size=0"):
    linear_attention(q, k, v, causal=True, chunk_size=0)
  with pytest.raises(ValueError, match="q and k must have the same shape"):
    linear_attention(q, k[:, :4], v, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_xla_memory_is_linear_in_length(causal):
  """Compiled (not run) forward+backward temp memory: the xla form grows ~linearly, the reference quadratically."""

  def temp_bytes(impl, length):
    q, k, v = (jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32) for _ in range(3))
    f = jax.grad(lambda q, k, v: jnp.sum(linear_attention(q, k, v, causal=causal, implementation=impl)),
                 argnums=(0, 1, 2))
    return jax.jit(f).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  xla_growth = temp_bytes("xla", 2048) / temp_bytes("xla", 512)
  ref_growth = temp_bytes("reference", 2048) / temp_bytes("reference", 512)
  assert xla_growth < 5.0, xla_growth  # 4x length -> ~4x memory
  assert ref_growth > 12.0, ref_growth  # 4x length -> ~16x memory


# bfloat16 against float32 at 8K tokens (docs/precision.md): bfloat16 matmuls with float32 accumulation, float32
# states and normalizers. Measured on CPU (xla form): outputs 3-4e-3 of the largest float32 magnitude (rms 2.5e-3),
# gradients <= 8.3e-3 (rms <= 6.4e-3): about the rounding of the inputs and outputs to bfloat16 (2^-9 = 2e-3
# relative). A state or normalizer accumulated in bfloat16 over 8K tokens would be off by far more.
BF16_VS_F32_TOL = {"out": (1e-2, 5e-3), "grads": (2e-2, 1e-2)}  # (max |err| / max |f32|, rms err / rms f32)


@pytest.mark.parametrize("causal", [True, False])
def test_bfloat16_matches_float32_at_8k_tokens(causal):
  q, k, v = _inputs(8192, b=1, h=1, f=64, d=64)
  ct = jax.random.normal(jax.random.key(7), v.shape)

  def value_and_grads(q, k, v):
    def loss(q, k, v):
      out = linear_attention(q, k, v, causal=causal, implementation="xla")
      return jnp.sum(out.astype(jnp.float32) * ct), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads

  run = jax.jit(value_and_grads)
  want, want_grads = run(q, k, v)
  got, got_grads = run(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert got.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_grads)
  for name, g, w in [("out", got, want)] + [("grads", g, w) for g, w in zip(got_grads, want_grads)]:
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    max_tol, rms_tol = BF16_VS_F32_TOL[name]
    assert np.abs(g - w).max() / np.abs(w).max() < max_tol, name
    assert np.sqrt(((g - w) ** 2).mean() / (w ** 2).mean()) < rms_tol, name
