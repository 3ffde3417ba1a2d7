"""scripts/generate.py: greedy decoding through the caches equals argmax over the parallel forward pass."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import wikitext2 as wt2_config
from lra.training import train_and_evaluate

from tests.conftest import load_script, python_path

ROOT = pathlib.Path(__file__).resolve().parents[2]
generate = load_script("generate")

pytestmark = pytest.mark.filterwarnings("ignore:.*the WikiText-2 release has")

CORPUS = " = Title = \n\n the cat sat on the mat . \n the dog sat on the log . \n a <unk> ran to the cat . \n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The workdir of a tiny softmax LM, trained once per module."""
  return _train(tmp_path_factory.mktemp("softmax"), "softmax")


def _train(tmp_path, attention_name: str) -> pathlib.Path:
  """A tiny word-level LM trained for a few steps on a synthetic WikiText-like corpus; returns its workdir."""
  data = tmp_path / "data"
  data.mkdir()
  for split in ("train", "valid", "test"):
    (data / f"wiki.{split}.tokens").write_text(CORPUS * 8)
  config = wt2_config.get_config(f"runlocal,attention={attention_name}")
  config.data.update(data_dir=str(data), cache_dir=str(tmp_path / "cache"), max_length=16)
  config.model.update(num_layers=2, emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0,
                      attention_dropout_rate=0.0)
  config.train.update(num_steps=8, batch_size=4, eval_batch_size=4, learning_rate=1e-2, warmup_steps=1,
                      log_every_steps=4, eval_every_steps=8, checkpoint_every_steps=8)
  workdir = tmp_path / "run"
  train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.parametrize("attention_name", ["softmax", "linear"])
def test_greedy_generation_equals_parallel_argmax(trained, attention_name):
  config = None
  if attention_name != "softmax":
    # Linear attention has softmax's parameters (the same projections), so the softmax run's checkpoint restores into
    # it: decoding through its recurrent state must equal its own parallel forward pass for any weights, trained or
    # not, and one training serves both (Generator's `config` replaces the run's config.json).
    config = generate.load_config(trained)
    config.model.attention = {"name": attention_name}
  gen = generate.Generator(trained, "latest", config=config)
  assert gen.config.model.attention.name == attention_name
  prompt = generate.tokenize("the cat sat zebra", gen.vocabulary)
  assert gen.vocabulary[prompt[-1]] == "<unk>"  # unknown words map to <unk>
  num_tokens = 16 - len(prompt) + 1  # fills every position of max_length = 16
  out = gen.generate(prompt, num_tokens, temperature=0.0)
  assert len(out) == num_tokens and all(0 <= t < len(gen.vocabulary) for t in out)

  # The parallel (non-decode) model on the whole sequence: its argmax at each position is the next token.
  sequence = np.asarray(prompt + out)[None]
  logits = gen.task.model().apply(gen.variables, {"inputs": jnp.asarray(sequence[:, :-1])}, train=False)
  expected = np.asarray(jnp.argmax(logits, axis=-1))[0, len(prompt) - 1:]
  np.testing.assert_array_equal(out, expected)

  # Sampling is reproducible by seed; top_k=1 is greedy.
  sampled = gen.generate(prompt, 4, temperature=1.0, seed=3)
  assert sampled == gen.generate(prompt, 4, temperature=1.0, seed=3)
  assert gen.generate(prompt, 4, temperature=2.0, top_k=1, seed=5) == out[:4]
  with pytest.raises(ValueError, match="max_length=16"):
    gen.generate(prompt, num_tokens + 1, temperature=0.0)


def test_command_line_and_errors(trained, tmp_path):
  workdir = trained
  env = {**os.environ, "PYTHONPATH": python_path(), "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run(  # noqa: E731
      [sys.executable, "scripts/generate.py", f"--workdir={workdir}", *args], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=env, check=False)
  proc = run("--prompt=the dog", "--num_tokens=5", "--temperature=0", "--checkpoint=best")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("the dog ") and len(proc.stdout.split()) >= 3

  # A prompt + num_tokens past max_length is Generator.generate's ValueError (checked in process above), which
  # cli.run prints as one `error:` line with exit status 2 (tests/lra/test_cli.py; generate.py's own flag errors:
  # tests/scripts/test_script_flags.py).

  # A variant without a decode path is refused before anything is restored.
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["attention"] = {"name": "linformer"}
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="linformer has no decode path"):
    generate.Generator(tmp_path, "latest")
  with pytest.raises(FileNotFoundError, match="config.json"):
    generate.Generator(tmp_path / "nowhere", "latest")
