"""WikiText-2: reader, vocabulary, blocks, exact perplexity, training with softmax and grassmann."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, wikitext2 as wt2_config
from lra import tasks
from lra.tasks.wikitext2 import build_vocab, read_tokens, to_blocks
from lra.training import Experiment, train_and_evaluate
from lra.training.metric_writers import read_metrics

# Tiny files stand in for the release files here: their sizes are meant to differ from the release's.
pytestmark = pytest.mark.filterwarnings("ignore::lra.tasks.record_checks.DataCountWarning")

TEXT = {
    "train": " = Title = \n\n the cat sat on the mat . \n the dog sat on the log . \n a <unk> ran . \n",
    "valid": " the cat ran . \n\n the dog sat . \n",
    "test": " a cat sat on a log . \n the mat . \n",
}


def _write(tmp_path, names="tokens"):
  for split, text in TEXT.items():
    name = f"wiki.{split}.tokens" if names == "tokens" else f"{split}.txt"
    (tmp_path / name).write_text(text * 6)
  return tmp_path


def _config(data_dir, cache_dir, **train):
  config = wt2_config.get_config("runlocal")
  config.data.data_dir = str(data_dir)
  config.data.cache_dir = str(cache_dir)
  config.data.max_length = 8
  config.model.update(num_layers=1, emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0,
                      attention_dropout_rate=0.0)
  config.train.update(num_steps=30, batch_size=4, eval_batch_size=4, learning_rate=1e-2, warmup_steps=2,
                      log_every_steps=5, eval_every_steps=30, checkpoint_every_steps=30)
  config.train.update(train)
  return config


def test_reader_adds_eos_per_line_including_blank_ones(tmp_path):
  (tmp_path / "x.txt").write_text(" a b \n\n c \n")
  assert read_tokens(tmp_path / "x.txt") == ["a", "b", "<eos>", "<eos>", "c", "<eos>"]
  assert build_vocab(["b", "a", "b"]) == {"<pad>": 0, "b": 1, "a": 2}


def test_blocks_cover_every_target_once():
  ids = np.arange(1, 24)  # 23 tokens -> 22 (input, target) pairs
  blocks = to_blocks(ids, 5, keep_tail=True)
  assert blocks["inputs"].shape == (5, 5)
  np.testing.assert_array_equal(blocks["targets"][blocks["mask"]], ids[1:])
  np.testing.assert_array_equal(blocks["inputs"][blocks["mask"]], ids[:-1])
  assert to_blocks(ids, 5, keep_tail=False)["inputs"].shape == (4, 5)


@pytest.mark.parametrize("names", ["tokens", "txt"])
def test_both_file_namings_and_missing_files(tmp_path, names):
  config = _config(_write(tmp_path, names), tmp_path / "cache")
  task = tasks.build(config)
  words = read_tokens(next(tmp_path.glob("*train*")))
  assert task.vocab_size == len(set(words)) + 1  # + <pad>
  assert task.dataset("validation").arrays["inputs"].shape[1] == config.data.max_length
  config.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="wiki.train.tokens"):
    tasks.build(config).dataset("train")


def test_perplexity_is_exact_over_the_whole_split(tmp_path):
  """A model whose next-token distribution is a known p at every position (zero embeddings, bias = log p) has
  perplexity exp(-mean log p[target]) over all target tokens of the split, the padded tail included."""
  config = _config(_write(tmp_path), tmp_path / "cache")
  exp = Experiment(config)
  state = exp.init_state()
  vocab = exp.task.vocab_size
  p = np.random.default_rng(0).dirichlet(np.ones(vocab)).astype(np.float32)
  params = jax.tree.map(np.asarray, state.params)
  params["encoder"]["embed"]["embedding"] = np.zeros_like(params["encoder"]["embed"]["embedding"])
  params["output_bias"] = np.log(p)
  metrics = exp.evaluate(state.replace(params=jax.tree.map(jnp.asarray, params)), "test")

  ids = exp.task._ids["test"]  # pylint: disable=protected-access
  want = math.exp(-np.mean(np.log(p[ids[1:]]).astype(np.float64)))
  assert len(ids[1:]) % config.data.max_length != 0  # the tail block is exercised
  assert metrics["perplexity"] == pytest.approx(want, rel=1e-5)
  # A uniform model has perplexity = vocabulary size.
  params["output_bias"] = np.zeros(vocab, np.float32)
  uniform = exp.evaluate(state.replace(params=jax.tree.map(jnp.asarray, params)), "validation")
  assert uniform["perplexity"] == pytest.approx(vocab, rel=1e-5)


def test_training_lowers_perplexity(tmp_path):
  # Grassmann, the variant whose paper evaluates on WikiText-2 (configs/wikitext2.py); the pipeline is the same for
  # every variant, softmax's language model is evaluated exactly above and trains in tests/lra/models/test_embeddings.
  config = _config(_write(tmp_path), tmp_path / "cache")
  config.model.attention = common.attention_config("grassmann")
  final = train_and_evaluate(config, tmp_path / "run")
  train = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"] - 0.3
  assert set(final) == {"validation", "test"} and final["test"]["perplexity"] > 1.0
