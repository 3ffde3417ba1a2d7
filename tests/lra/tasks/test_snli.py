"""SNLI: reader (gold labels, tokens, vocabulary), dev-only training split, two-tower model, training smoke runs."""

import gzip
import json

import numpy as np
import pytest

from configs import common, snli as snli_config
from lra import tasks
from lra.tasks.snli import read_pairs, tokenize
from lra.training import train_and_evaluate
from lra.training.metric_writers import read_metrics

# Tiny files stand in for the release files here: their sizes are meant to differ from the release's.
pytestmark = pytest.mark.filterwarnings("ignore::lra.tasks.record_checks.DataCountWarning")

WORDS = ["a", "man", "woman", "dog", "runs", "sleeps", "plays", "outside", "inside", "the", "park"]


def _pairs(n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    premise = " ".join(rng.choice(WORDS, size=rng.integers(3, 8)))
    label = ["entailment", "neutral", "contradiction", "-"][i % 4]
    # The label is recoverable: entailment repeats the premise, contradiction negates it.
    hypothesis = {"entailment": premise, "neutral": premise + " today", "contradiction": "no " + premise,
                  "-": premise}[label]
    out.append({"gold_label": label, "sentence1": premise.capitalize() + ".", "sentence2": hypothesis + "!"})
  return out


def _write(tmp_path):
  splits = {"dev": 240, "test": 60}
  for i, (split, n) in enumerate(splits.items()):
    lines = "".join(json.dumps(p) + "\n" for p in _pairs(n, i))
    if split == "test":
      with gzip.open(tmp_path / f"snli_1.0_{split}.jsonl.gz", "wt") as f:
        f.write(lines)
    else:
      (tmp_path / f"snli_1.0_{split}.jsonl").write_text(lines)
  return tmp_path


def _config(data_dir, cache_dir, **train):
  config = snli_config.get_config("runlocal")
  config.data.update(data_dir=str(data_dir), cache_dir=str(cache_dir), max_length=12)
  config.model.update(num_layers=1, emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, head_mlp_dim=32,
                      dropout_rate=0.0, attention_dropout_rate=0.0)
  config.train.update(num_steps=40, batch_size=16, eval_batch_size=16, learning_rate=1e-2, warmup_steps=2,
                      log_every_steps=10, eval_every_steps=40, checkpoint_every_steps=40)
  config.train.update(train)
  return config


def test_reader_drops_pairs_without_gold_label(tmp_path):
  path = _write(tmp_path) / "snli_1.0_dev.jsonl"
  pairs = read_pairs(path)
  assert len(pairs) == 180  # every fourth pair has gold_label "-"
  assert {label for _, _, label in pairs} == {0, 1, 2}
  assert tokenize("A man, outside!") == ["a", "man", ",", "outside", "!"]


def test_dev_only_splits_and_vocabulary(tmp_path):
  task = tasks.build(_config(_write(tmp_path), tmp_path / "cache"))
  sizes = {s: len(task.dataset(s)) for s in ("train", "validation", "test")}
  assert sizes == {"train": 162, "validation": 18, "test": 45}
  train = task.dataset("train").arrays
  np.testing.assert_array_equal(train["mask1"], train["inputs1"] != 0)
  assert task.vocab_size == len(set(WORDS) | {"no", "today", ".", "!"}) + 2


def test_full_config_needs_the_train_split(tmp_path):
  config = _config(_write(tmp_path), tmp_path / "cache")
  config.data.train_source = "train"
  with pytest.raises(FileNotFoundError, match="snli_1.0_train.*train_source=dev"):
    tasks.build(config).dataset("train")
  (tmp_path / "snli_1.0_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _pairs(80, 7)))
  assert len(tasks.build(config).dataset("train")) == 60


def test_training_learns_the_toy_labels(tmp_path):
  # Grassmann, the variant whose paper evaluates on SNLI (configs/snli.py); the task's pipeline is the same for every
  # variant, and softmax trains in every other task's tests. 20 steps: the loss falls ~0.3 (0.1 asserted).
  config = _config(_write(tmp_path), tmp_path / "cache", num_steps=20, log_every_steps=5, eval_every_steps=20,
                   checkpoint_every_steps=20)
  config.model.attention = common.attention_config("grassmann")
  final = train_and_evaluate(config, tmp_path / "run")
  train = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"] - 0.1
  assert 0.0 <= final["test"]["accuracy"] <= 1.0
