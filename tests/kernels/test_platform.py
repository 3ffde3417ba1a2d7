"""kernels.platform: the kernel is chosen where the program is lowered, fallbacks are logged once (only when lowered
for the platform that falls back), an explicit kernel request never falls back. Plain jnp "kernels" keep it fast."""

import contextvars
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import platform

OP = "tests.platform_op"


def _dispatched(x, gpu_kernel):
  # Distinct ops mark the branch in the lowered gradient: xla is sin (cosine), the "tpu kernel" tanh, the "gpu" exp.
  return platform.dispatch(OP, xla=lambda: jnp.sin(x), kernels={"tpu": lambda: jnp.tanh(x), "gpu": gpu_kernel(x)})


def _text(fn, platform_name: str) -> str:
  spec = jax.ShapeDtypeStruct((4,), jnp.float32)
  return jax.export.export(jax.jit(jax.grad(lambda x: jnp.sum(fn(x)))), platforms=[platform_name])(spec).mlir_module()


def test_accelerator_of():
  assert platform.accelerator_of("tpu") == "tpu"
  assert [platform.accelerator_of(p) for p in ("cuda", "rocm", "gpu", "GPU")] == ["gpu"] * 4
  assert platform.accelerator_of("cpu") is None


def test_dispatch_lowers_only_the_branch_of_the_lowering_platform(caplog):
  platform._logged.clear()  # noqa: SLF001
  fn = lambda x: _dispatched(x, lambda x: "head_dim=48 is not a multiple of 64")  # noqa: E731
  with caplog.at_level(logging.WARNING, logger="kernels"):
    cpu, tpu = _text(fn, "cpu"), _text(fn, "tpu")
    assert not caplog.records  # the gpu reason is not logged for cpu or tpu programs
    cuda = _text(fn, "cuda")
    _text(fn, "cuda")
  assert "stablehlo.tanh" in tpu and "stablehlo.cosine" not in tpu
  assert "stablehlo.cosine" in cpu and "stablehlo.cosine" in cuda
  assert "stablehlo.tanh" not in cpu and "stablehlo.tanh" not in cuda
  assert [r.getMessage() for r in caplog.records] == [
      f"{OP}: Pallas kernel cannot serve this call on cuda (head_dim=48 is not a multiple of 64); using xla"]
  # Executed on this CPU host: the xla branch, and its gradient.
  x = jnp.arange(4.0)
  np.testing.assert_allclose(jax.jit(fn)(x), jnp.sin(x), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(fn(x)))(x), jnp.cos(x), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(fn)(x[None]), jnp.sin(x)[None], rtol=1e-6)


def test_rocm_falls_back_with_a_reason(caplog):
  platform._logged.clear()  # noqa: SLF001
  fn = lambda x: _dispatched(x, lambda x: (lambda: jnp.exp(x)))  # noqa: E731
  with caplog.at_level(logging.WARNING, logger="kernels"):
    assert "stablehlo.exponential" in _text(fn, "cuda")
    assert not caplog.records
    _text(fn, "rocm")
  assert "on rocm (the Mosaic GPU kernels target NVIDIA GPUs (cuda) only); using xla" in caplog.records[0].getMessage()


def test_require_kernel_never_falls_back():
  def fn(x):
    return platform.require_kernel(OP, kernels={"tpu": lambda: jnp.tanh(x), "gpu": "dtype=float32: use bf16"})

  assert "stablehlo.tanh" in _text(fn, "tpu")
  with pytest.raises(platform.KernelUnavailableError, match=r"cannot run on cuda: dtype=float32: use bf16"):
    _text(fn, "cuda")  # under jax.grad too: the check is not dead code
  with pytest.raises(ValueError, match=r"cannot run on cpu: no Pallas kernel for this platform"):
    fn(jnp.ones(4))  # eagerly, on this host
  with pytest.raises(ValueError, match=r"has no kernel for this call \(tpu: a; gpu: b\)"):
    platform.require_kernel(OP, kernels={"tpu": "a", "gpu": "b"})


def test_fallback_note_survives_remat_custom_vjp_and_scan(caplog):
  """The note's effect joins jax's effect registries (the one private use, kernels/platform.py): a dispatched op inside
  remat, a custom_vjp and a scan still lowers its note for cuda under jax.grad."""
  platform._logged.clear()  # noqa: SLF001
  reason = "head_dim=48 is not a multiple of 64 (inside remat/custom_vjp/scan)"

  @jax.custom_vjp
  def wrapped(x):
    return _dispatched(x, lambda x: reason)

  wrapped.defvjp(lambda x: (wrapped(x), x), lambda x, g: (g * jnp.cos(x),))
  body = jax.checkpoint(lambda x: wrapped(x) + _dispatched(x, lambda x: reason))
  fn = lambda x: jax.lax.scan(lambda c, _: (body(c), None), x, None, length=2)[0]  # noqa: E731
  with caplog.at_level(logging.WARNING, logger="kernels"):
    _text(fn, "cuda")
  assert [r.getMessage() for r in caplog.records] == [
      f"{OP}: Pallas kernel cannot serve this call on cuda ({reason}); using xla"]


def test_private_effect_registries_missing_is_one_line(tmp_path, monkeypatch):
  """A jax whose private effect registries moved fails at import with one line naming the version and the fix."""
  (tmp_path / "fake_effects.py").write_text("lowerable_effects = None\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ImportError) as e:
    platform._private_effect_registries("fake_effects")  # noqa: SLF001
  message = str(e.value)
  assert "\n" not in message and f"jax {jax.__version__} has no fake_effects.control_flow_allowed_effects" in message
  assert "checked with jax 0.10, 0.11" in message and "update kernels/platform.py" in message
  assert len(platform._private_effect_registries()) == 3  # noqa: SLF001  (the installed jax has them)


def test_local_staging_traces_only_xla_on_this_cpu_host_and_exports_still_stage_every_platform(monkeypatch, caplog):
  traced = []

  def fn(x):
    def tpu():
      traced.append("tpu")
      return jnp.tanh(x)
    return platform.dispatch(OP, xla=lambda: jnp.sin(x), kernels={"tpu": tpu, "gpu": "no gpu kernel here"})

  x = jnp.arange(4.0)
  monkeypatch.delenv("EA_KERNEL_STAGING", raising=False)
  assert contextvars.Context().run(platform.staging_mode) == "all"
  jax.jit(lambda x: fn(x))(x)
  assert traced == ["tpu"]  # the default stages every platform, even for a CPU program
  platform._logged.clear()  # noqa: SLF001
  with platform.staging("local"), caplog.at_level(logging.INFO, logger="kernels"):
    np.testing.assert_allclose(jax.jit(lambda x: fn(x))(x), jnp.sin(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(fn(x)))(x), jnp.cos(x), rtol=1e-6)
    assert traced == ["tpu"]  # not traced again: only the XLA form was staged
    assert sum("kernel staging 'local'" in r.getMessage() for r in caplog.records) == 1  # said once
    tpu_text = _text(fn, "tpu")  # an export stages every platform whatever the mode
  assert traced == ["tpu", "tpu"] and "stablehlo.tanh" in tpu_text
  # The environment, where no `staging` block is in force (a fresh context: the suite's session runs in one).
  fresh = lambda: contextvars.Context().run(platform.staging_mode)  # noqa: E731
  monkeypatch.setenv("EA_KERNEL_STAGING", "local")
  assert fresh() == "local"
  with platform.staging("all"):
    assert platform.staging_mode() == "all"  # the context overrides the environment
  monkeypatch.setenv("EA_KERNEL_STAGING", "fast")
  with pytest.raises(ValueError, match=r"EA_KERNEL_STAGING='fast': expected one of \('all', 'local'\)"):
    fresh()


@pytest.mark.parametrize("op", ["softmax", "block_sparse"])
def test_an_export_after_a_local_trace_of_the_same_call_still_holds_the_kernels(op):
  """The ops' module-level jits take the staging as a static argument: their trace staged for this CPU alone (under
  "local") is not the one a later export of the same shapes gets from jax's cache."""
  from kernels.block_sparse import block_sparse_attention  # noqa: PLC0415
  from kernels.softmax import softmax_attention  # noqa: PLC0415
  q = jnp.zeros((1, 256, 1, 64), jnp.bfloat16)
  layout = np.tril(np.ones((1, 4, 4), bool))
  call = {"softmax": lambda q: softmax_attention(q, q, q, causal=True),
          "block_sparse": lambda q: block_sparse_attention(q, q, q, layout, block_size=64, causal=True)}[op]
  with platform.staging("local"):
    jax.jit(lambda q: call(q)).lower(q)  # traced for this CPU only (the op's inner jit is cached with that trace)
    text = jax.export.export(jax.jit(lambda q: call(q)), platforms=["tpu"])(q).mlir_module()
  assert "flex_fwd" in text, f"{op}: the tpu export lacks the flex kernel (a CPU-only trace was reused)"
