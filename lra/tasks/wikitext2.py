"""WikiText-2 word-level language modelling (Merity et al., 2016).

Reads `wiki.{train,valid,test}.tokens` (the release) or `{train,valid,test}.txt` (the same files as shipped with
pytorch/examples) from `config.data.data_dir`. Every line, blank lines included, is split on whitespace and ends
with `<eos>`, as the standard word-LM pipeline; the vocabulary is the training split's types in order of first
appearance (33,278 with `<eos>`; valid and test have no other types) plus `<pad>` at id 0. The token stream is cut
into contiguous blocks of `config.data.max_length` inputs with the next tokens as targets. Evaluation splits keep
their last, shorter block (padded and masked), so perplexity is exact over every token of the split:
`exp(total NLL / number of target tokens)`, never a mean of batch perplexities.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from lra.tasks import cache, record_checks
from lra.tasks.base import ArrayDataset
from lra.tasks.causal_lm import LanguageModelTask
from lra.tasks.registry import register

SPLIT_NAMES = {"train": "train", "validation": "valid", "test": "test"}
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Tokens per split of the WikiText-2 (v1) release, one <eos> per line included: checked when the files are read.
RELEASE_TOKENS = {"train": 2_088_628, "validation": 217_646, "test": 245_569}


def split_path(data_dir: Path, split: str) -> Path:
  """The split's file under either naming; FileNotFoundError naming both and where to get them."""
  stem = SPLIT_NAMES[split]
  candidates = [data_dir / f"wiki.{stem}.tokens", data_dir / f"{stem}.txt"]
  for path in candidates:
    if path.exists():
      return path
  raise FileNotFoundError(
      f"WikiText-2 {split} split not found: tried {', '.join(map(str, candidates))}. Download WikiText-2 (v1, "
      f"tokenized: wikitext-2-v1.zip) and point --config.data.data_dir at the folder holding wiki.train.tokens.")


def read_tokens(path: Path) -> list[str]:
  """The file's whitespace-separated words, `<eos>` after every line; ValueError naming the file if it is not text."""
  words: list[str] = []
  with open(path, encoding="utf-8") as f, record_checks.reading(path, "UTF-8 text file of space-separated tokens"):
    for line in f:
      words.extend(line.split())
      words.append(EOS)
  if not words:
    raise ValueError(f"{path} is empty; expected the WikiText-2 {path.stem} split (one article line per line)")
  return words


def build_vocab(train_words: list[str]) -> dict[str, int]:
  vocab = {PAD: 0}
  for w in train_words:
    if w not in vocab:
      vocab[w] = len(vocab)
  return vocab


def to_blocks(ids: np.ndarray, max_length: int, keep_tail: bool) -> dict[str, np.ndarray]:
  """Contiguous `[n, max_length]` input/target blocks; with `keep_tail` the last partial block is padded."""
  inputs, targets = ids[:-1], ids[1:]
  n_full = len(inputs) // max_length
  n = n_full + (1 if keep_tail and len(inputs) % max_length else 0)
  out_in = np.zeros((n, max_length), np.int32)
  out_tg = np.zeros((n, max_length), np.int32)
  mask = np.zeros((n, max_length), bool)
  used = min(len(inputs), n * max_length)
  out_in.reshape(-1)[:used] = inputs[:used]
  out_tg.reshape(-1)[:used] = targets[:used]
  mask.reshape(-1)[:used] = True
  return {"inputs": out_in, "targets": out_tg, "mask": mask}


@register("wikitext2")
class WikiText2(LanguageModelTask):
  """Next-word prediction; metrics: loss (mean token NLL), perplexity, accuracy. Best checkpoint: lowest
  validation perplexity."""

  best_metric = "perplexity"
  best_mode = "min"

  def _data_dir(self) -> Path:
    data_dir = self.config.data.get("data_dir")
    if not data_dir:
      raise FileNotFoundError("config.data.data_dir is not set: point it at the WikiText-2 folder holding "
                              "wiki.{train,valid,test}.tokens or {train,valid,test}.txt")
    return Path(data_dir).expanduser()

  @functools.cached_property
  def _ids(self) -> dict[str, np.ndarray]:
    data_dir = self._data_dir()
    paths = {split: split_path(data_dir, split) for split in SPLIT_NAMES}
    key = cache.key_of("wikitext2", [cache.file_fingerprint(p) for p in paths.values()])

    def make():
      words = {split: read_tokens(path) for split, path in paths.items()}
      for split, path in paths.items():
        record_checks.check_count(path, "tokens including <eos>", len(words[split]), RELEASE_TOKENS[split],
                                  "WikiText-2")
      vocab = build_vocab(words["train"])
      unk = vocab.get(UNK, 0)
      out = {split: np.asarray([vocab.get(w, unk) for w in ws], np.int32) for split, ws in words.items()}
      out["vocab_size"] = np.asarray(len(vocab))
      return out

    return cache.cached_arrays(cache.cache_dir(self.config.data) / "wikitext2" / f"ids_{key}.npz", make)

  @property
  def vocab_size(self) -> int:
    return int(self._ids["vocab_size"])

  @functools.cached_property
  def vocabulary(self) -> list[str]:
    """The word of each token id (what scripts/generate.py tokenizes prompts with); re-read from the train split."""
    vocab = build_vocab(read_tokens(split_path(self._data_dir(), "train")))
    return sorted(vocab, key=vocab.__getitem__)

  def build_dataset(self, split: str) -> ArrayDataset:
    return ArrayDataset(to_blocks(self._ids[split], self.config.data.max_length, keep_tail=split != "train"))

  def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    return {**metrics, "perplexity": math.exp(min(metrics["loss"], 700.0))}
