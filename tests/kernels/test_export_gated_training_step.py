"""A bfloat16 WikiText-2 training step with `gated_deltanet` and with `mamba2` (issue 35), as
`lra.training.trainer.Experiment` builds it, exported for `cuda` and `tpu` from this CPU host (jax.export, nothing
executed), like tests/kernels/test_export_training_step.py. mamba2's core (a decay per head) and gated_deltanet's (the
gated delta rule) have Mosaic TPU and Mosaic GPU kernels: the steps exported for tpu and cuda hold their forward and
backward calls by name. Where no kernel would serve the call, the step would hold the chunked XLA form with the reason
logged once per platform (checked here when a kernel is missing)."""

from __future__ import annotations

import functools
import logging
import re
from unittest import mock

import jax
import pytest

from configs import wikitext2
from kernels import platform as kernel_platform
from lra.tasks.wikitext2 import WikiText2
from lra.training import trainer

LENGTH, BATCH = 64, 2
VOCAB = 33_278  # WikiText-2's vocabulary: the step is traced without reading the corpus ("WikiText-2-like")
CUSTOM_CALLS = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu"}  # the kernels' custom-call targets per platform
VARIANTS = {"gated_deltanet": "delta_rule_attention", "mamba2": "gated_linear_attention"}
GATED_KERNELS = ("gated_linear_fwd", "gated_linear_bwd_dq", "gated_linear_bwd_dk", "gated_linear_bwd_dv")
KERNELS = {("mamba2", "tpu"): GATED_KERNELS, ("mamba2", "cuda"): GATED_KERNELS,
           ("gated_deltanet", "tpu"): ("delta_rule_fwd", "delta_rule_bwd"),
           ("gated_deltanet", "cuda"): ("delta_rule_fwd", "delta_rule_bwd")}


@functools.lru_cache(maxsize=None)
def _step_and_args(name: str):
  config = wikitext2.get_config(f"runlocal,attention={name}")
  config.model.update(dtype="bfloat16", num_layers=1, qkv_dim=128, num_heads=2, emb_dim=64, mlp_dim=64)
  config.data.max_length = LENGTH
  config.train.batch_size = BATCH
  config.train.eval_batch_size = BATCH
  with mock.patch.object(WikiText2, "vocab_size", property(lambda self: VOCAB)):
    experiment = trainer.Experiment(config)
    # The parameter shapes only: the init's trace (batch 1, train=False) stages just the XLA forms ("local"), not both
    # platforms' kernels; nothing of it is exported (the step's own trace, under jax.export, stages every platform).
    with kernel_platform.staging("local"):
      state_shapes = jax.eval_shape(experiment.init_state)
  rep, data = experiment.replicated, experiment.batch_sharding
  abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  state = jax.tree_util.tree_map(lambda x: abstract(x, rep), state_shapes)
  batch = {k: abstract(v, data) for k, v in experiment.task.dummy_batch(BATCH).items()}
  return experiment.jit_train_step, (state, batch, abstract(experiment.key, rep))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bfloat16_wikitext2_step_exports_for_accelerators_with_the_xla_form_logged(name, caplog):
  step, args = _step_and_args(name)
  for platform in ("cuda", "tpu"):
    with caplog.at_level(logging.WARNING, logger="kernels"):
      module = jax.export.export(step, platforms=[platform], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(*args).mlir_module()
    assert "bf16" in module
    calls = re.findall(r"custom_call @(tpu_custom_call|mosaic_gpu\w*)\(", module)
    kernels = KERNELS.get((name, platform))
    if kernels:
      assert calls and all(c.startswith(CUSTOM_CALLS[platform]) for c in calls), calls
      assert all(kernel in module for kernel in kernels), f"{name} on {platform} lacks one of {kernels}"
      continue
    assert not calls, f"{name} on {platform}: {calls}"
    op = VARIANTS[name]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{op}: ")]
    assert any(f"on {platform} (no Pallas kernel" in m for m in logged) or _logged_before(op, platform), logged


def _logged_before(op: str, platform: str) -> bool:
  """The fallback is logged once per process: an earlier export in this process may have said it."""
  from kernels import platform as platform_lib  # pylint: disable=import-outside-toplevel
  return any(key[0] == op and key[1] == platform for key in platform_lib._logged)  # pylint: disable=protected-access
