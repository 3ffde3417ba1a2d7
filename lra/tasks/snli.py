"""SNLI (Bowman et al., 2015): 3-way natural language inference with a two-tower sentence encoder.

Reads `snli_1.0_{train,dev,test}.jsonl` (or `.jsonl.gz`) from `config.data.data_dir`, drops pairs without a gold
label (`gold_label == "-"`), lowercases and splits words and punctuation, and builds the word vocabulary from the
training source only (`<pad>` = 0, `<unk>` = 1). Each sentence is truncated / padded to `config.data.max_length`.
The model is one shared encoder applied to premise and hypothesis, `[u, v, u*v, |u-v|]`, an MLP and 3 classes.

`config.data.train_source`: "train" (the official training split, the default) or "dev" (for machines that only have
dev and test: the dev pairs are shuffled with `config.seed` and split into training and validation by
`config.data.validation_fraction`; test stays the official test split). Results from "dev" training are not
comparable to published SNLI numbers.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np

from lra.tasks import cache, record_checks
from lra.tasks.base import ArrayDataset, MatchingTask
from lra.tasks.registry import register

LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
NO_GOLD_LABEL = "-"
# Pairs with a gold label in each split of the SNLI 1.0 release: checked when the files are read.
RELEASE_PAIRS = {"train": 549_367, "dev": 9_842, "test": 9_824}
FILES = {"train": "snli_1.0_train", "dev": "snli_1.0_dev", "test": "snli_1.0_test"}
PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(sentence: str) -> list[str]:
  return _TOKEN.findall(sentence.lower())


def find_file(data_dir: Path, source: str) -> Path:
  candidates = [data_dir / f"{FILES[source]}.jsonl", data_dir / f"{FILES[source]}.jsonl.gz"]
  for path in candidates:
    if path.exists():
      return path
  raise FileNotFoundError(
      f"SNLI {source} split not found: tried {', '.join(map(str, candidates))}. Download SNLI 1.0 (snli_1.0.zip) and "
      f"point --config.data.data_dir at the folder holding the jsonl files"
      + ("; with only dev and test available, set --config.data.train_source=dev" if source == "train" else ""))


def read_pairs(path: Path) -> list[tuple[list[str], list[str], int]]:
  """(premise tokens, hypothesis tokens, label) for every pair with a gold label.

  Each line must be a JSON object with string `sentence1`, `sentence2` and a `gold_label` among LABELS or "-" (no
  agreement: skipped); anything else, and a corrupt .gz, is a ValueError naming the file and line.
  """
  pairs = []
  expected = "gzip-compressed SNLI jsonl file" if path.suffix == ".gz" else "UTF-8 SNLI jsonl file"
  with record_checks.open_text(path) as f, record_checks.reading(path, expected, "download snli_1.0.zip again"):
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        example = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not a JSON object ({e.msg} at column {e.colno}): "
                         f"{line.strip()[:60]!r}") from None
      if not isinstance(example, dict):
        raise ValueError(f"{path}:{line_number}: expected a JSON object per line, got {type(example).__name__}")
      label = example.get("gold_label")
      if label == NO_GOLD_LABEL:  # annotators did not agree
        continue
      if label not in LABELS:
        raise ValueError(f"{path}:{line_number}: gold_label {label!r}; expected one of {', '.join(LABELS)} or "
                         f"{NO_GOLD_LABEL!r}")
      sentences = [example.get(key) for key in ("sentence1", "sentence2")]
      for key, sentence in zip(("sentence1", "sentence2"), sentences):
        if not isinstance(sentence, str):
          raise ValueError(f"{path}:{line_number}: field {key!r} is {sentence!r}; expected a string")
      pairs.append((tokenize(sentences[0]), tokenize(sentences[1]), LABELS[label]))
  if not pairs:
    raise ValueError(f"{path} holds no labelled pairs")
  return pairs


def encode(pairs, vocab: dict[str, int], max_length: int) -> dict[str, np.ndarray]:
  n = len(pairs)
  arrays = {"inputs1": np.zeros((n, max_length), np.int32), "inputs2": np.zeros((n, max_length), np.int32),
            "targets": np.asarray([p[2] for p in pairs], np.int32)}
  unk = vocab[UNK]
  for i, (premise, hypothesis, _) in enumerate(pairs):
    for key, tokens in (("inputs1", premise), ("inputs2", hypothesis)):
      ids = [vocab.get(t, unk) for t in tokens[:max_length]]
      arrays[key][i, :len(ids)] = ids
  return arrays


@register("snli")
class SNLI(MatchingTask):
  """Premise/hypothesis classification into entailment, neutral, contradiction."""

  num_classes = 3
  input_dtype = np.int32
  abs_difference = True  # |u - v|, the SNLI convention

  @functools.cached_property
  def _arrays(self) -> dict[str, dict[str, np.ndarray]]:
    data = self.config.data
    source = data.get("train_source", "train")
    if source not in ("train", "dev"):
      raise ValueError(f"config.data.train_source must be 'train' or 'dev', got {source!r}")
    data_dir = Path(data.data_dir).expanduser() if data.get("data_dir") else None
    if data_dir is None:
      raise FileNotFoundError("config.data.data_dir is not set: point it at the folder holding snli_1.0_*.jsonl(.gz)")
    paths = {s: find_file(data_dir, s) for s in ((source, "test") if source == "dev" else ("train", "dev", "test"))}
    fraction = float(data.get("validation_fraction", 0.1))
    key = cache.key_of("snli", [cache.file_fingerprint(p) for p in paths.values()], source, data.max_length,
                       fraction, self.config.seed)

    def make():
      pairs = {s: read_pairs(p) for s, p in paths.items()}
      for s, p in paths.items():
        record_checks.check_count(p, "pairs with a gold label", len(pairs[s]), RELEASE_PAIRS[s], "SNLI 1.0")
      if source == "dev":
        order = np.random.default_rng(self.config.seed).permutation(len(pairs["dev"]))
        n_val = max(1, int(round(fraction * len(order))))
        splits = {"train": [pairs["dev"][i] for i in order[n_val:]],
                  "validation": [pairs["dev"][i] for i in order[:n_val]], "test": pairs["test"]}
      else:
        splits = {"train": pairs["train"], "validation": pairs["dev"], "test": pairs["test"]}
      vocab = {PAD: 0, UNK: 1}
      for premise, hypothesis, _ in splits["train"]:  # vocabulary from the training pairs only
        for token in premise + hypothesis:
          vocab.setdefault(token, len(vocab))
      out = {f"{s}/{k}": v for s, ps in splits.items() for k, v in encode(ps, vocab, data.max_length).items()}
      out["vocab_size"] = np.asarray(len(vocab))
      return out

    flat = cache.cached_arrays(cache.cache_dir(data) / "snli" / f"{key}.npz", make)
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, value in flat.items():
      if "/" in name:
        split, field = name.split("/")
        out.setdefault(split, {})[field] = value
    out["_meta"] = {"vocab_size": flat["vocab_size"]}
    return out

  @property
  def vocab_size(self) -> int:
    return int(self._arrays["_meta"]["vocab_size"])

  def build_dataset(self, split: str) -> ArrayDataset:
    arrays = dict(self._arrays[split])
    arrays["mask1"], arrays["mask2"] = arrays["inputs1"] != 0, arrays["inputs2"] != 0  # from the pad token only
    return ArrayDataset(arrays)
