"""Block-sparse kernels inside lowered programs, from this CPU-only machine: flex's Pallas kernels over the layout
(global rows and columns, dropout) lower for TPU and CUDA with `jax.export`, and `implementation=None` chooses at lowering time: the
kernels on cuda/tpu, XLA on cpu, a logged fallback when a kernel cannot serve the call, and an error for an explicit
"pallas".

The 4K-token BigBird export through `implementation=None` (kernels on cuda/tpu, one trace) also stands for the former
per-backend export of the same layout through `block_sparse_attention_kernels` with each backend's plan: the public
entry runs that driver with the plan of the platform it is lowered for."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.sparse_layouts import bigbird_layout
from kernels import block_sparse_attention, platform

PLATFORMS = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", "mosaic_gpu_v2")}
KERNELS = ["flex_fwd", "flex_bwd_dq", "flex_bwd_dkv"]  # one kernel family


def _export(fn, platform_name, target, *specs):
  return _export_jitted(_jitted_grad(fn), platform_name, target, *specs)


def _jitted_grad(fn):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))


def _export_jitted(grad, platform_name, target, *specs):
  """Exports `grad` for `platform_name`; exports of one jitted `grad` share its trace (most of the cost)."""
  exported = jax.export.export(grad, platforms=[platform_name],
                               disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*specs)
  return exported.mlir_module()


def _kernel_calls(module: str, target: str) -> int:
  return len(re.findall(rf"custom_call @{target}\(", module))


def _default_loss(layout, block_size, **options):
  def loss(q, k, v):
    out = block_sparse_attention(q, k, v, layout, block_size=block_size, **options)
    return jnp.sum(out.astype(jnp.float32))
  return loss


def test_default_implementation_is_chosen_where_the_program_is_lowered():
  """BigBird at 4K tokens (two global blocks, per-head random blocks), key padding and dropout, `implementation=None`:
  one call per kernel on tpu and on cuda (dropout no longer forces XLA), no kernel on cpu. One trace, lowered for the
  three platforms."""
  block_size, length = 128, 4096
  layout = bigbird_layout(length // block_size, num_global_blocks=2, num_random_blocks=2, num_heads=2, seed=0)

  def loss(q, k, v, key_mask):
    out = block_sparse_attention(q, k, v, layout, block_size=block_size, key_mask=key_mask, dropout_rate=0.1,
                                 dropout_rng=jax.random.key(0))
    return jnp.sum(out.astype(jnp.float32))

  specs = (*[jax.ShapeDtypeStruct((1, length, 2, 64), jnp.bfloat16)] * 3, jax.ShapeDtypeStruct((1, length), jnp.bool_))
  grad = _jitted_grad(loss)
  for backend, (platform_name, target) in PLATFORMS.items():
    module = _export_jitted(grad, platform_name, target, *specs)
    assert _kernel_calls(module, target) == len(KERNELS), backend
    for name in KERNELS:
      assert re.search(rf"\b{name}\b", module), (backend, name)
  cpu = grad.lower(*specs).as_text()
  assert "tpu_custom_call" not in cpu and "mosaic_gpu" not in cpu and "flex_fwd" not in cpu


def test_fallback_is_logged_once_with_its_reason_and_explicit_pallas_raises(caplog):
  layout = np.ones((1, 4, 4), bool)
  spec = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32)  # float32: the GPU kernel takes bfloat16/float16 only
  platform._logged.clear()
  with caplog.at_level(logging.WARNING, logger="kernels"):
    for _ in range(2):
      module = _export(_default_loss(layout, 64), "cuda", "mosaic_gpu_v2", spec, spec, spec)
      assert _kernel_calls(module, "mosaic_gpu_v2") == 0
  lines = [r.getMessage() for r in caplog.records if "block_sparse_attention" in r.getMessage()]
  reason = "dtype=float32: the Mosaic GPU kernels take only bfloat16/float16"
  assert len(lines) == 1 and reason in lines[0] and "xla" in lines[0]
  explicit = _jitted_grad(_default_loss(layout, 64, implementation="pallas"))  # one trace for both platforms
  with pytest.raises(ValueError, match=f"{reason}.*config.model.dtype='bfloat16'"):
    _export_jitted(explicit, "cuda", "mosaic_gpu_v2", spec, spec, spec)
  # The TPU kernel serves the same call.
  module = _export_jitted(explicit, "tpu", "tpu_custom_call", spec, spec, spec)
  assert _kernel_calls(module, "tpu_custom_call") == len(KERNELS)
