"""scripts/plot_attention.py: weights per layer and head for the variants that have them (rows are distributions
over the keys the layer allows; a layout's blocked keys stay at zero), a PNG from a tiny run's checkpoint, and a
one-line refusal for a variant without weights."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import flax.linen as nn

from configs import wikitext2 as wt2_config
from lra import cli
from lra.training import Experiment
from tests.conftest import load_script, python_path, write_untrained_workdir

ROOT = pathlib.Path(__file__).resolve().parents[2]
plot_attention = load_script("plot_attention")
pytestmark = pytest.mark.filterwarnings("ignore:.*the WikiText-2 release has")

CORPUS = " = Title = \n\n the cat sat on the mat . \n the dog sat on the log . \n a <unk> ran to the cat . \n"


def _config(tmp_path, attention_name: str, options=None, pos_encoding="learned"):
  data = tmp_path / "data"
  data.mkdir(exist_ok=True)
  for split in ("train", "valid", "test"):
    (data / f"wiki.{split}.tokens").write_text(CORPUS * 8)
  config = wt2_config.get_config(f"runlocal,attention={attention_name}")
  config.model.attention.update(options or {})
  config.data.update(data_dir=str(data), cache_dir=str(tmp_path / "cache"), max_length=12)
  config.model.update(num_layers=2, emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0,
                      attention_dropout_rate=0.0, pos_encoding=pos_encoding)
  config.train.update(num_steps=3, batch_size=4, eval_batch_size=4, warmup_steps=1, log_every_steps=3,
                      eval_every_steps=3, checkpoint_every_steps=3)
  return config


VARIANTS = [("softmax", {}, "rope"), ("softmax", {}, "alibi"), ("additive", {"chunk_size": 5}, "alibi"),
            ("multiplicative", {"form": "general"}, "none"), ("local", {"block_size": 4, "window": 1}, "learned"),
            ("linear", {}, "sinusoidal")]


@pytest.mark.parametrize("name,options,pos_encoding", VARIANTS)
def test_maps_are_distributions_over_the_allowed_keys(tmp_path, name, options, pos_encoding):
  exp = Experiment(_config(tmp_path, name, options, pos_encoding))
  batch = {"inputs": (np.arange(12)[None] % 9).astype(np.int32)}
  variables = exp.model.init(jax.random.key(0), batch)
  maps = plot_attention.attention_maps(exp.model, variables, batch)
  assert [m[0] for m in maps] == ["encoder/block_0/attention", "encoder/block_1/attention"]
  for _, variant, weights, allowed in maps:
    assert variant == name and weights.shape == (2, 12, 12)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert np.all(weights[~allowed] == 0.0)
    assert not allowed[:, np.triu_indices(12, 1)[0], np.triu_indices(12, 1)[1]].any()  # causal LM
  if name == "local":  # the band layout is visible: far keys are blocked
    assert not allowed[:, 11, 0].any()
  # The plotted weights are the ones the layer applied: per head, weights @ (its value projection) equals what the
  # layer hands its `out` projection (scale, RoPE, ALiBi and the layout included: a map recomputed with any of them
  # wrong fails here, while rows summing to 1 would not notice).
  values, mixed = _values_and_mixed(exp.model, variables, batch)
  assert sorted(values) == sorted(m[0] for m in maps)
  for path, _, weights, _ in maps:
    expected_LxHxD = np.einsum("hls,shd->lhd", weights, values[path][0])
    np.testing.assert_allclose(expected_LxHxD, mixed[path][0], rtol=1e-4, atol=1e-5, err_msg=f"{name} {path}")


def _values_and_mixed(model, variables, batch):
  """Per attention layer: its `value` projection's output and its `out` projection's input ([B, L, H, D] each)."""
  values, mixed = {}, {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = context.module.path
    if context.method_name == "__call__" and len(path) > 1 and context.module.name in ("value", "out"):
      key = "/".join(path[:-1])
      if context.module.name == "value":
        values[key] = np.asarray(out, np.float32)
      else:
        mixed[key] = np.asarray(args[0], np.float32)
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, batch, train=False)
  return values, mixed


def test_the_weights_check_can_fail(tmp_path):
  """A map recomputed without ALiBi (as if the script forgot it) does not reproduce the layer's mixing."""
  exp = Experiment(_config(tmp_path, "softmax", {}, "alibi"))
  batch = {"inputs": (np.arange(12)[None] % 9).astype(np.int32)}
  variables = exp.model.init(jax.random.key(0), batch)
  captured = plot_attention.capture(exp.model, variables, batch)
  path, c = captured[0]
  no_alibi = c.module.clone(positions="none")
  c.module = no_alibi
  weights = np.asarray(plot_attention.softmax_weights(c)[0][0])
  values, mixed = _values_and_mixed(exp.model, variables, batch)
  wrong_LxHxD = np.einsum("hls,shd->lhd", weights, values[path][0])
  assert np.abs(wrong_LxHxD - mixed[path][0]).max() > 1e-3


def test_a_variant_without_weights_is_refused_in_one_line():
  with pytest.raises(cli.UserError) as error:
    plot_attention.check_variant("grassmann")
  assert "grassmann" in str(error.value) and "\n" not in str(error.value)


def test_plot_script_writes_a_png_from_a_checkpoint(tmp_path):
  # A run's folder as training leaves it: config.json (the trainer's record of the config) and a checkpoint written
  # by the training library's Checkpoints, here of the initial state: the script draws whatever weights it restores,
  # and training them first would only add the compilation of a train and an eval step.
  workdir = tmp_path / "run"
  write_untrained_workdir(workdir, _config(tmp_path, "softmax"), 1)
  env = {**os.environ, "PYTHONPATH": python_path(), "JAX_PLATFORMS": "cpu"}
  output = tmp_path / "maps.png"
  result = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_attention.py"), f"--workdir={workdir}",
                           "--checkpoint=latest", "--text=the cat sat on the mat", f"--output={output}"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 1000
