"""kernels.flex inside lowered programs, from this CPU host: a bfloat16 GQA step with a window mask, ALiBi, key
padding and dropout exports for TPU and for CUDA holding the three flex kernels (Mosaic TPU, Mosaic GPU) and no
`[L, L]` tensor; float32 on cuda and a score_mod closing over a trainable table run the XLA form with one logged line
naming why; an explicit "pallas" never falls back.

Each program is traced once (one `jax.jit` object per module) and exported for both platforms: `jax.export` reuses the
jit's trace, and the trace (all of `platform_dependent`'s branches, both backends' kernels) is most of the cost. One
`platforms=("tpu", "cuda")` export cannot replace the two: the platform branch kept for each platform is still lowered
under both, and the Pallas kernels' lowering refuses multi-platform lowering (jax 0.10: "mpmd_map does not support
multi-platform lowering")."""

import functools
import logging
import re

import jax
import jax.numpy as jnp
import pytest

from kernels import flex, platform

L, H, HKV, D = 512, 4, 2, 64
KERNELS = ("flex_fwd", "flex_bwd_dq", "flex_bwd_dkv")
window = lambda b, h, i, j: (j <= i) & (i - j < 200)  # noqa: E731


def _export(loss, platform_name, target, *specs):
  return _export_jitted(_jitted_grad(loss), platform_name, target, *specs)


def _jitted_grad(loss):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _export_jitted(grad, platform_name, target, *specs):
  checks = [jax.export.DisabledSafetyCheck.custom_call(target)] if target else []
  return jax.export.export(grad, platforms=[platform_name], disabled_checks=checks)(*specs).mlir_module()


def _specs(dtype=jnp.bfloat16):
  qs = jax.ShapeDtypeStruct((2, L, H, D), dtype)
  kvs = jax.ShapeDtypeStruct((2, L, HKV, D), dtype)
  return qs, kvs, kvs, jax.ShapeDtypeStruct((2, L), jnp.bool_), jax.random.key(0)


def _loss(**options):
  def loss(q, k, v, key_mask, rng):
    out = flex.flex_attention(q, k, v, key_mask=key_mask, dropout_rate=0.1, dropout_rng=rng, **options)
    return jnp.sum(out.astype(jnp.float32))
  return loss


def _no_square(module: str) -> bool:
  return not re.search(rf"tensor<[0-9x]*{L}x{L}x", module)


@functools.lru_cache(maxsize=None)
def _window_alibi_grad():
  """One jitted step for both platforms' exports (one trace)."""
  return _jitted_grad(_loss(mask_mod=window, score_mod=flex.alibi(H)))


@pytest.mark.parametrize("platform_name,target", [("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu_v2")])
def test_export_holds_the_kernels(platform_name, target):
  module = _export_jitted(_window_alibi_grad(), platform_name, target, *_specs())
  assert len(re.findall(rf"custom_call @{target}\(", module)) == len(KERNELS)
  for name in KERNELS:
    assert re.search(rf"\b{name}\b", module), name
  assert _no_square(module)


def test_fallbacks_are_logged_with_their_reason_and_explicit_pallas_raises(caplog):
  with caplog.at_level(logging.WARNING, logger="kernels"):
    module = _export(_loss(mask_mod=window), "cuda", None, *_specs(jnp.float32))
  assert "tpu_custom_call" not in module and "mosaic_gpu" not in module and _no_square(module)
  assert any("flex_attention" in r.message and "dtype=float32" in r.message for r in caplog.records)
  table = jnp.zeros((32, H))
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="kernels"):
    module = _export(_loss(mask_mod=window, score_mod=flex.relative_position_bias(table)), "tpu", None, *_specs())
  assert "tpu_custom_call" not in module
  assert any("score_mod closes over arrays" in r.message for r in caplog.records)
  with pytest.raises(platform.KernelUnavailableError):
    _export(_loss(mask_mod=window, implementation="pallas"), "cpu", None, *_specs())


@functools.lru_cache(maxsize=None)
def _selected_branch_grad():
  """One jitted step for both platforms' exports (one trace)."""
  from attention import adaptive_sparse  # noqa: PLC0415

  def loss(q, k, v):
    pooled = k.reshape(2, L // 64, 64, HKV, D).mean(2).astype(jnp.float32)
    scores = jnp.einsum("blxd,bnxd->blxn", q[:, :, :HKV].astype(jnp.float32), pooled)
    sel = jax.lax.stop_gradient(jax.lax.top_k(scores, 2)[1])
    out = adaptive_sparse._selected_flex(q, k, v, sel, block_size=64, causal=True, key_mask_BxS=None,  # noqa: SLF001
                                         scale=D ** -0.5, q_offset=0, dropout_rate=0.0, dropout_rng=None, q_tile=64)
    return jnp.sum(out)

  return _jitted_grad(loss)


@pytest.mark.export
@pytest.mark.parametrize("platform_name,target", [("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu_v2")])
def test_export_of_the_selected_branch_holds_the_kernels(platform_name, target):
  """NSA/MoBA's selected branch (`adaptive_sparse._selected_flex`, flex's dispatch choosing): a per-token top-2
  selection of 64-token blocks computed inside the step, its mask closing over the traced selection, exports with
  the three flex kernels (fed the traced lists and partial-tile bitmaps) and no `[L, L]` tensor."""
  qs, kvs = _specs()[:2]
  module = _export_jitted(_selected_branch_grad(), platform_name, target, qs, kvs, kvs)
  assert len(re.findall(rf"custom_call @{target}\(", module)) == len(KERNELS)
  for name in KERNELS:
    assert re.search(rf"\b{name}\b", module), name
  assert _no_square(module)


@pytest.mark.export
def test_export_of_a_traced_document_mask_holds_the_kernels():
  """Per-example document ids, an argument of the step: the traced tables and bitmaps feed the kernels on tpu and
  cuda (one export each) instead of sending the call to the XLA form. (No `[L, L]` check here: the traced builder
  classifies the tiles on the whole index grid, a chunk of query tiles at a time, and with its default list widths
  (every key tile) the bitmaps' capacity is L x L too; a `kv_width` bound shrinks both lists and bitmaps.)"""
  def loss(q, k, v, doc):
    mask = lambda b, h, i, j: (doc[b, i] == doc[b, j]) & (j <= i)  # noqa: E731
    return jnp.sum(flex.flex_attention(q, k, v, mask_mod=mask).astype(jnp.float32))

  qs, kvs = _specs()[:2]
  doc = jax.ShapeDtypeStruct((2, L), jnp.int32)
  grad = _jitted_grad(loss)  # one trace, two exports
  for platform_name, target in (("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu_v2")):
    module = _export_jitted(grad, platform_name, target, qs, kvs, kvs, doc)
    assert len(re.findall(rf"custom_call @{target}\(", module)) == len(KERNELS), platform_name
