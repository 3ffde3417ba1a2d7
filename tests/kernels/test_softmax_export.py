"""A bfloat16 training step of the LRA Text encoder with softmax and attention dropout, exported for `cuda` and `tpu`
from this CPU host, holds the flash kernels (the flex kernels with no mask: `kernels.softmax.pallas`, issue 33's one
kernel family) and no `[L, L]`-sized tensor anywhere in the lowered module; lowered for `cpu` it holds the XLA flash
form, again without an `[L, L]` tensor (at 1024 tokens there: the flash form's chunks are 512 keys, so a shorter step is one chunk).

Text config, 2 layers, 256 tokens (+1 CLS position: the attention sees 257, padded to whole tiles inside the kernels), head
dim 64 (qkv 256 over 4 heads), attention dropout 0.1, batch 2, `implementation=None`. Nothing runs: the step
(`Experiment.jit_train_step` with its mesh shardings) is traced and lowered (`jax.export`) with `disabled_checks` for
the kernels' custom calls. The cuda and tpu exports share one step object (one trace: `jax.export` reuses it).
"""

from __future__ import annotations

import functools
import re

import jax
import pytest

from configs.lra import text
from kernels import platform as kernel_platform
from lra.training import trainer

TARGETS = {"cuda": "mosaic_gpu_v2", "tpu": "tpu_custom_call"}
KERNELS = ("flex_fwd", "flex_bwd_dq", "flex_bwd_dkv")
LENGTHS, BATCH = {"cuda": 256, "tpu": 256, "cpu": 1024}, 2


@functools.lru_cache(maxsize=None)
def _step_and_args(length: int):
  """`Experiment.jit_train_step` and its abstract (state, batch, key), one per length: exports share its trace."""
  config = text.get_config("runlocal,attention=softmax")
  config.model.update(dtype="bfloat16", num_layers=2, qkv_dim=256, num_heads=4, attention_dropout_rate=0.1)
  config.data.max_length = length
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


def _lowered_text(platform: str) -> str:
  step, args = _step_and_args(LENGTHS[platform])
  exported = jax.export.export(
      step, platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in TARGETS.values()])(*args)
  return exported.mlir_module()


def _square_shapes(module: str, length: int) -> list[str]:
  """Tensor types with two dimensions both at least the sequence length (the attention sees length + 1)."""
  return [t for t in re.findall(r"tensor<([0-9x]+)x\w+>", module)
          if sum(int(d) >= length for d in t.split("x")) >= 2]


@pytest.mark.parametrize("platform", ["cuda", "tpu", "cpu"])
def test_bfloat16_text_step_with_dropout_holds_flash_and_no_length_squared_tensor(platform):
  module = _lowered_text(platform)
  calls = set(re.findall(r"custom_call @(tpu_custom_call|mosaic_gpu\w*)\(", module))
  if platform == "cpu":
    assert not calls, f"lowered for cpu: kernel custom calls {calls}"
  else:
    assert calls == {TARGETS[platform]}, f"exported for {platform}: kernel custom calls {calls}"
    for kernel in KERNELS:
      assert re.search(rf"\b{kernel}", module), f"exported for {platform} lacks the flash kernel {kernel}"
  assert "bf16" in module
  square = _square_shapes(module, LENGTHS[platform])
  assert not square, f"[L, L]-sized tensors in the {platform} step: {square[:5]}"
