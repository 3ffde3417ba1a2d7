"""Positional encodings: the sinusoid tables against their formulas, RoPE's relativity and decode, evaluation beyond
the training length for every encoding but "learned", refusals naming variant and encoding, and eval.py at another
length (one tiny rope run's checkpoint)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
from types import ModuleType

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags

from attention import positions
from configs import wikitext2 as wt2_config
from lra.models import Encoder, embeddings
from lra import cli
from lra.training import evaluate_checkpoint
from tests.attention import contract
from tests.conftest import python_path, write_untrained_workdir

ROOT = pathlib.Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.filterwarnings("ignore:.*the WikiText-2 release has")


def test_sinusoidal_is_vaswanis_interleaved_formula():
  table = embeddings.sinusoidal_table(40, 10)
  for pos in range(40):
    for i in range(5):
      angle = pos / 10000 ** (2 * i / 10)
      assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=2e-5)
      assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=2e-5)


def test_lra_sinusoidal_is_the_lra_table():
  """First half sin, second half cos, frequencies 10000^(-i/(F/2-1)) (flax's old sinusoidal_init, used by LRA)."""
  table = embeddings.lra_sinusoidal_table(30, 8)
  for pos in range(30):
    for i in range(4):
      angle = pos * math.exp(-i * math.log(10000) / 3)
      assert table[pos, i] == pytest.approx(math.sin(angle), abs=2e-5)
      assert table[pos, 4 + i] == pytest.approx(math.cos(angle), abs=2e-5)


def test_rope_scores_depend_on_the_offset_only():
  q = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
  k = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
  scores = lambda a, b: jnp.einsum("blhd,bshd->bhls", a, b)  # noqa: E731
  base = scores(positions.rope(q), positions.rope(k))
  for shift in (1, 37, 1000):
    np.testing.assert_allclose(scores(positions.rope(q, shift), positions.rope(k, shift)), base, atol=2e-4)
  # Not trivially invariant: shifting only the queries changes the scores.
  assert not np.allclose(scores(positions.rope(q, 3), positions.rope(k)), base, atol=1e-2)
  # A rotation: norms are kept.
  np.testing.assert_allclose(jnp.linalg.norm(positions.rope(q, 5), axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("name,options", [("softmax", {}), ("multiplicative", {"form": "dot"})])
def test_rope_decode_at_t_equals_parallel_at_t(name, options):
  contract.check_decode_equals_parallel(name, num_heads=2, positions="rope", **options)


def test_softmax_alibi_equals_an_explicit_bias_and_decodes():
  import attention  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(2), (2, 7, 12))
  layer = attention.build("softmax", num_heads=2, causal=True, positions="alibi", implementation="xla")
  variables = layer.init(jax.random.key(3), x)
  p = variables["params"]
  q, k, v = (jnp.einsum("blf,fhd->blhd", x, p[n]["kernel"]) + p[n]["bias"] for n in ("query", "key", "value"))
  slopes = np.asarray(positions.alibi_slopes(2))
  i, j = np.arange(7)[:, None], np.arange(7)[None, :]
  scores = jnp.einsum("blhd,bshd->bhls", q, k) / np.sqrt(6) - slopes[None, :, None, None] * np.abs(i - j)
  weights = jax.nn.softmax(jnp.where(i >= j, scores, -1e30), axis=-1)
  want = jnp.einsum("bhls,bshd,hdf->blf", weights, v, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(layer.apply(variables, x), want, atol=2e-5, rtol=2e-5)
  contract.check_decode_equals_parallel("softmax", num_heads=2, positions="alibi")


SMALL = dict(vocab_size=20, emb_dim=16, num_layers=1, num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0,
             attention_dropout_rate=0.0, pooling="none", causal=True)
# Each encoding that extrapolates, with a variant that takes it.
EXTRAPOLATING = [("sinusoidal", "softmax"), ("lra_sinusoidal", "softmax"), ("rope", "softmax"),
                 ("alibi", "softmax"), ("alibi", "multiplicative"), ("none", "softmax")]


@pytest.mark.parametrize("pos_encoding,variant", EXTRAPOLATING)
def test_encoder_evaluates_beyond_its_training_length(pos_encoding, variant):
  """Parameters made at max_length=8 run at 32 tokens; causal outputs of the first 8 are those of the short input."""
  encoder = Encoder(**SMALL, max_length=8, pos_encoding=pos_encoding, attention={"name": variant})
  tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 20)
  variables = encoder.init(jax.random.key(1), tokens[:, :8])
  apply = jax.jit(encoder.apply)  # compiled per length: cheaper than op by op
  long = apply(variables, tokens)
  assert long.shape == (2, 32, 16) and np.all(np.isfinite(long))
  np.testing.assert_allclose(long[:, :8], apply(variables, tokens[:, :8]), atol=1e-5)


def test_learned_positions_refuse_longer_inputs():
  encoder = Encoder(**SMALL, max_length=8, pos_encoding="learned")
  tokens = jnp.zeros((1, 12), jnp.int32)
  variables = encoder.init(jax.random.key(0), tokens[:, :8])
  with pytest.raises(ValueError, match="sequence length 12 exceeds max_length=8 of pos_encoding='learned'"):
    encoder.apply(variables, tokens)


@pytest.mark.parametrize("pos_encoding,variant", [("rope", "linear"), ("alibi", "local"), ("rope", "additive")])
def test_a_variant_that_cannot_take_an_encoding_refuses_naming_both(pos_encoding, variant):
  encoder = Encoder(**SMALL, max_length=8, pos_encoding=pos_encoding, attention={"name": variant})
  with pytest.raises(ValueError, match=f"attention {variant} cannot take pos_encoding='{pos_encoding}'"):
    encoder.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


CORPUS = " = Title = \n\n the cat sat on the mat . \n the dog sat on the log . \n a <unk> ran to the cat . \n"


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory) -> pathlib.Path:
  """The workdir of a tiny causal LM (length 8, rope positions) as training leaves it: config.json (the trainer's
  record of the config) and a checkpoint written by the training library, here of the initial state (evaluation at
  any length restores whatever weights are there; training them first only added a traced train step)."""
  tmp = tmp_path_factory.mktemp("rope")
  data = tmp / "data"
  data.mkdir()
  for split in ("train", "valid", "test"):
    (data / f"wiki.{split}.tokens").write_text(CORPUS * 8)
  config = wt2_config.get_config("runlocal")
  config.data.update(data_dir=str(data), cache_dir=str(tmp / "cache"), max_length=8)
  config.model.update(num_layers=1, emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0,
                      attention_dropout_rate=0.0, pos_encoding="rope")
  config.train.update(num_steps=4, batch_size=4, eval_batch_size=4, warmup_steps=1, log_every_steps=4,
                      eval_every_steps=4, checkpoint_every_steps=4)
  workdir = tmp / "run"
  write_untrained_workdir(workdir, config, 4)
  return workdir


def _eval(workdir: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": python_path(), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(ROOT / "eval.py"), f"--workdir={workdir}", "--split=validation",
                         "--checkpoint=latest", *flags], capture_output=True, text=True, env=env, timeout=600,
                        check=False)


def test_eval_py_at_another_length(rope_run):
  """eval.py evaluates a rope checkpoint at 4x its training length, beside the run's own result."""
  # The run's own length in this process: where evaluate_checkpoint writes which length is decided there.
  config = ml_collections.ConfigDict(json.loads((rope_run / "config.json").read_text()))
  evaluate_checkpoint(config, rope_run, "validation", "latest")
  own_result = json.loads((rope_run / "eval_validation.json").read_text())
  assert own_result["max_length"] == 8 and "trained_max_length" not in own_result
  result = _eval(rope_run, "--max_length=32")
  assert result.returncode == 0, result.stderr[-2000:]
  saved = json.loads((rope_run / "eval_validation_length32.json").read_text())
  assert saved["max_length"] == 32 and saved["trained_max_length"] == 8 and math.isfinite(saved["perplexity"])
  # The run's own result is not overwritten by the other length's (it was, with the same numbers, before).
  assert json.loads((rope_run / "eval_validation.json").read_text()) == own_result


def _import_eval_py() -> ModuleType:
  """eval.py as a module, its absl flags removed again (as tests.conftest.load_script does for scripts/)."""
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location("eval_py_for_tests", ROOT / "eval.py")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  finally:
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)
  return module


def test_eval_py_refuses_another_length_for_learned_positions_in_one_line(capsys):
  """eval.py's check before evaluating (no run needed: it reads the config only); `cli.run`, which eval.py's command
  line runs through (its one-line errors and exit status 2 from a subprocess: tests/lra/test_cli.py), prints it."""
  eval_script = _import_eval_py()
  config = wt2_config.get_config("runlocal")
  config.model.pos_encoding = "learned"
  config.data.max_length = 32
  with pytest.raises(SystemExit) as info:
    cli.run(lambda argv: eval_script.check_extrapolation(config, 8), argv=["eval.py"])
  assert info.value.code == cli.EXIT_USER_ERROR
  [line] = capsys.readouterr().err.splitlines()
  assert line.startswith("error: ") and "pos_encoding='learned'" in line and "32" in line, line
