"""Issue 33's export target: bfloat16 training steps of LRA Text and WikiText-2 with a flex mask and ALiBi (the
`flex` variant: `mask="sliding_window"`, `score="alibi"`), exported for cuda and tpu from this CPU host
(`jax.export`, nothing executed), hold the flex kernels forward and backward and no `[L, L]` tensor.

The steps are `Experiment.jit_train_step` with the trainer's shardings (1 layer, head dim 64, 512 tokens, batch 2,
attention dropout 0.1); the data are tiny files written here (an aclImdb tree, WikiText-2 token files). The module
runs under the default kernel staging ("all"): it exports."""

from __future__ import annotations

import re

import jax
import pytest

from configs import wikitext2
from configs.lra import text
from lra.training import trainer
from tests.lra.tasks.test_text import _write_aclimdb

LENGTH = 512
FLEX_KERNELS = ("flex_fwd", "flex_bwd_dq", "flex_bwd_dkv")


def _config(task: str, tmp_path):
  if task == "text":
    _write_aclimdb(tmp_path)
    config = text.get_config("runlocal,attention=flex")
  else:
    for split in ("train", "valid", "test"):
      (tmp_path / f"wiki.{split}.tokens").write_text(" the cat sat on the mat . \n the dog sat on the log . \n" * 40)
    config = wikitext2.get_config("runlocal,attention=flex")
  config.model.update(dtype="bfloat16", num_layers=1, num_heads=2, qkv_dim=128, emb_dim=128, mlp_dim=128,
                      attention_dropout_rate=0.1)
  config.model.attention.update(mask="sliding_window", window=64, score="alibi")
  config.data.update(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), max_length=LENGTH)
  config.train.batch_size = config.train.eval_batch_size = 2
  return config


@pytest.mark.export
@pytest.mark.parametrize("task", ["text", "wikitext2"])
def test_bfloat16_step_with_a_flex_mask_and_alibi_exports_with_the_kernels(task, tmp_path):
  experiment = trainer.Experiment(_config(task, tmp_path))
  rep, data = experiment.replicated, experiment.batch_sharding
  abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  state = jax.tree_util.tree_map(lambda x: abstract(x, rep), jax.eval_shape(experiment.init_state))
  batch = {k: abstract(v, data) for k, v in experiment.task.dummy_batch(2).items()}
  length = batch["inputs"].shape[1]
  assert length == LENGTH, length
  exported = jax.jit(experiment.jit_train_step)  # one trace shared by both platforms' exports
  for platform in ("cuda", "tpu"):
    module = jax.export.export(exported, platforms=[platform])(state, batch,
                                                               abstract(experiment.key, rep)).mlir_module()
    assert "bf16" in module, platform
    for name in FLEX_KERNELS:
      assert re.search(rf"\b{name}\b", module), f"{task} {platform}: no {name}"
    square = [t for t in re.findall(r"tensor<([0-9x]+)x\w+>", module)
              if sum(int(d) == length for d in t.split("x")) >= 2]
    assert not square, f"[L, L] tensors in the {task} step for {platform}: {square[:5]}"
