"""A whole bfloat16 training step, as `lra.training.trainer.Experiment` builds it, holds the project's Pallas kernels
when exported for `cuda` and for `tpu` from this CPU host, and none when lowered for `cpu` (issue 13).

ListOps runlocal with `model.dtype="bfloat16"`, head dim 64 (qkv_dim 128 over 2 heads), attention dropout 0.1,
1 layer (2 for transnormer, whose two layer kinds alternate), 256 tokens (a multiple of every block size), batch 2.
`implementation` is left at None: the kernel choice happens where the program is lowered
(`kernels.platform.dispatch`). The step is `Experiment.jit_train_step` itself, with its mesh shardings: under a mesh,
jax traces shardings into the kernels' bodies (a `jnp.full_like` there became a `reshard` that Mosaic GPU could not
lower: the H100 failure of issue 13), so a step jitted without them would not test what training runs. Nothing is
executed on an accelerator: the step is only traced and lowered (`jax.export`), with `disabled_checks` for the kernels'
custom-call targets. Every variant runs with its registry defaults (longformer: one dilated head), performer's 256
random features included (the Mosaic GPU kernel takes 64 or 128 features per call; the driver runs 256 as two
128-wide feature blocks, issue 21).
A second test exports a bfloat16 causal language-model step (MQAR, 1,024 tokens) for the causal kernels (issue 32).

Cost: each step is traced once (`jax.export` reuses the jit's trace for the three platforms; the trace, with both
backends' kernels in `platform_dependent`'s branches, is most of the ~5-12 s per variant). One multi-platform export
cannot share more: the Pallas kernels refuse multi-platform lowering (see tests/kernels/test_flex_lowering.py).
Variants whose kernel paths a kept case (or the op-level lowering tests) already exports are not exported here:
- `linear` (both tests): elu features at head dim 64 into the (non-)causal linear-attention kernels with the
  normalizer; `transnormer`'s "norm" layer runs the same kernels at the same feature width (without the normalizer),
  `performer` / `based` run them with the normalizer (wider features), and tests/kernels/test_lowering.py lowers
  `linear_attention(normalize=True)` at head dims 64 and 128, causal and not, for both platforms.
- `local`, `sparse_transformer`: their 32-token blocks in 64-token tiles evaluate their masks in partial tiles like
  `longformer`'s, whose mask holds every operation theirs use (`lax.div`, `lax.rem`, `abs`, comparisons, `|`:
  attention/sparse_layouts.py); which tiles are partial is table data, not lowering.
- `bigbird`: its per-head block table (one table row per query head) is what its kernels get beyond longformer's
  defaults; longformer runs here with one dilated head (`dilation=2, num_dilated_heads=1`), so its tables are
  per-head too, and tests/kernels/test_block_sparse_lowering.py exports per-head BigBird layouts through the same
  flex kernels. Not covered any more: bigbird's own layer choosing the kernels inside a whole step.
"""

from __future__ import annotations

import functools
import logging
import re

import jax
import pytest

from configs import mqar
from configs.lra import listops
from kernels import platform as kernel_platform
from lra.training import trainer

TARGETS = {"cuda": "mosaic_gpu_v2", "tpu": "tpu_custom_call"}
LINEAR_KERNELS = ("linear_attention_fwd", "linear_attention_bwd")  # non-causal: *_fwd(_state), *_bwd(_state)
FLEX_KERNELS = ("flex_fwd", "flex_bwd_dq", "flex_bwd_dkv")
VARIANTS = {  # name: (attention options, kernel names the exported step must hold, layers)
    "performer": ({}, LINEAR_KERNELS, 1),  # num_features=256: two 128-wide feature blocks on cuda
    "transnormer": ({}, LINEAR_KERNELS, 2),  # layer 0 "diag" (block-diagonal softmax, XLA), layer 1 "norm" (kernel)
    # Through the flex kernels: 32-token blocks run in 64-token tiles whose partial tiles evaluate the mask (window,
    # global blocks, and head 1's dilated window: a mask telling heads apart, so per-head tables and `h` in the mask).
    "longformer": ({"dilation": 2, "num_dilated_heads": 1}, FLEX_KERNELS, 1),
}
LENGTH, BATCH = 256, 2


def _config(name: str, options: dict, num_layers: int):
  config = listops.get_config(f"runlocal,attention={name}")
  config.model.update(dtype="bfloat16", num_layers=num_layers, qkv_dim=128, num_heads=2, attention_dropout_rate=0.1)
  for key, value in options.items():
    config.model.attention[key] = value
  config.data.max_length = LENGTH
  config.train.batch_size = BATCH
  config.train.eval_batch_size = BATCH
  return config


@functools.lru_cache(maxsize=None)
def _step_and_args(name: str):
  """`Experiment.jit_train_step` and abstract arguments (state, batch, key) carrying the shardings training gives them
  (`NamedSharding`s over the experiment's mesh: without them the kernels are traced without a mesh)."""
  options, _, num_layers = VARIANTS[name]
  experiment = trainer.Experiment(_config(name, options, num_layers))
  rep, data = experiment.replicated, experiment.batch_sharding
  abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  # The parameter shapes only: the init's trace (batch 1, train=False) stages just the XLA forms ("local"), not both
  # platforms' kernels; nothing of it is exported (the step's own trace, under jax.export, stages every platform).
  with kernel_platform.staging("local"):
    state_shapes = jax.eval_shape(experiment.init_state)
  state = jax.tree_util.tree_map(lambda x: abstract(x, rep), state_shapes)
  batch = {k: abstract(v, data) for k, v in experiment.task.dummy_batch(BATCH).items()}
  return experiment.jit_train_step, (state, batch, abstract(experiment.key, rep))


def _lowered_text(name: str, platform: str) -> str:
  step, args = _step_and_args(name)
  exported = jax.export.export(
      step, platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in TARGETS.values()])(*args)
  return exported.mlir_module()


def _kernel_calls(module: str) -> list[str]:
  return re.findall(r"custom_call @(tpu_custom_call|mosaic_gpu\w*)\(", module)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bfloat16_training_step_holds_the_kernels_for_accelerators_and_xla_for_cpu(name):
  _, kernel_names, _ = VARIANTS[name]
  for platform, target in TARGETS.items():
    module = _lowered_text(name, platform)
    calls = _kernel_calls(module)
    assert calls and set(calls) == {target}, f"{name} exported for {platform}: kernel custom calls {calls}"
    for kernel in kernel_names:
      assert re.search(rf"\b{kernel}", module), f"{name} exported for {platform} lacks the kernel {kernel}"
    assert "bf16" in module
  cpu = _lowered_text(name, "cpu")
  assert not _kernel_calls(cpu), f"{name} lowered for cpu holds kernel custom calls"
  assert not any(re.search(rf"\b{kernel}", cpu) for kernel in kernel_names)



# A bfloat16 causal language-model training step (issue 32): MQAR at 1,024 tokens, head dim 64 (qkv 128 over 2 heads),
# 1 layer (the registry defaults give transnormer's "norm" kernel layer and based's "hybrid" Taylor + window layer), a
# vocabulary of 256 (smaller than the length, so an `[L, L]` buffer cannot hide behind the logits' `[L, vocab]`
# shape). Each variant's step holds its causal kernels, forward and backward, and no `[L, L]`-sized tensor; softmax is
# the flash default (the flex kernels with the causal mask: one kernel family, issue 33). Nothing runs: export only.
CAUSAL_LINEAR_KERNELS = ("linear_attention_fwd", "linear_attention_bwd_dq", "linear_attention_bwd_dk")  # tpu: dkv
LM_VARIANTS = {"performer": CAUSAL_LINEAR_KERNELS,
               "transnormer": CAUSAL_LINEAR_KERNELS, "based": CAUSAL_LINEAR_KERNELS, "softmax": FLEX_KERNELS}
LM_LENGTH, LM_VOCAB = 1024, 256


@functools.lru_cache(maxsize=None)
def _lm_step_and_args(name: str):
  config = mqar.get_config(f"attention={name}")
  config.model.update(dtype="bfloat16", num_layers=1, emb_dim=128, qkv_dim=128, num_heads=2, mlp_dim=256)
  config.data.max_length = LM_LENGTH
  config.data.generate.vocab_size = LM_VOCAB
  config.train.batch_size = config.train.eval_batch_size = BATCH
  experiment = trainer.Experiment(config)
  rep, data = experiment.replicated, experiment.batch_sharding
  abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  # The parameter shapes only: the init's trace (batch 1, train=False) stages just the XLA forms ("local"), not both
  # platforms' kernels; nothing of it is exported (the step's own trace, under jax.export, stages every platform).
  with kernel_platform.staging("local"):
    state_shapes = jax.eval_shape(experiment.init_state)
  state = jax.tree_util.tree_map(lambda x: abstract(x, rep), state_shapes)
  batch = {k: abstract(v, data) for k, v in experiment.task.dummy_batch(BATCH).items()}
  return experiment.jit_train_step, (state, batch, abstract(experiment.key, rep))


def _square_shapes(module: str, length: int) -> list[str]:
  """Tensor types with two dimensions both at least the sequence length."""
  return [t for t in re.findall(r"tensor<([0-9x]+)x\w+>", module) if sum(int(d) >= length for d in t.split("x")) >= 2]


@pytest.mark.parametrize("name", list(LM_VARIANTS))
def test_bfloat16_causal_lm_step_exports_with_the_causal_kernels_and_no_length_squared_tensor(name, caplog):
  step, args = _lm_step_and_args(name)
  for platform, target in TARGETS.items():
    with caplog.at_level(logging.WARNING, logger="kernels"):
      exported = jax.export.export(
          step, platforms=[platform],
          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in TARGETS.values()])(*args)
    module = exported.mlir_module()
    calls = _kernel_calls(module)
    assert calls and set(calls) == {target}, f"{name} exported for {platform}: kernel custom calls {calls}"
    for kernel in LM_VARIANTS[name]:
      assert re.search(rf"\b{kernel}", module), f"{name} exported for {platform} lacks the kernel {kernel}"
    assert "bf16" in module
    square = _square_shapes(module, LM_LENGTH)
    assert not square, f"[L, L]-sized tensors in the {name} step for {platform}: {square[:5]}"
  fallbacks = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
  assert not fallbacks, fallbacks  # every attention layer's call reached its kernel (based's window has none: XLA)
