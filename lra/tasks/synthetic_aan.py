"""A small SYNTHETIC stand-in for LRA Retrieval's AAN data, in the same TSV format; for `runlocal` and tests only.

The real task asks whether one ACL paper cites another from their texts. Here each document is made of words about one
of `num_topics` made-up topics (each topic has its own words over its own few letters, mixed with common words), and
a pair is labelled 1 when both documents are about the same topic. Files are `new_aan_pairs.{train,eval,test}.tsv`
with the LRA columns `label id1 id2 text1 text2` (no header); ids read `synthetic-<split>-<n>` so the data is never
mistaken for AAN. Labels are balanced; the output is a function of the arguments.
"""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

import numpy as np

SPLIT_FILES = {"train": "new_aan_pairs.train.tsv", "eval": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
_LETTERS = np.array(list(string.ascii_lowercase))


def _words(rng: np.random.Generator, letters: np.ndarray, count: int) -> list[str]:
  return ["".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(count)]


class _Vocabulary:
  """Common words over the whole alphabet, and per topic, words over that topic's letters."""

  def __init__(self, rng: np.random.Generator, num_topics: int, letters_per_topic: int = 6, words_per_topic: int = 40,
               num_common: int = 300):
    self.common = _words(rng, _LETTERS, num_common)
    self.topics = [_words(rng, rng.choice(_LETTERS, letters_per_topic, replace=False), words_per_topic)
                   for _ in range(num_topics)]

  def document(self, rng: np.random.Generator, topic: int, length: int, topic_share: float) -> str:
    words, size = [], 0
    while size < length:
      pool = self.topics[topic] if rng.random() < topic_share else self.common
      word = pool[rng.integers(len(pool))]
      if rng.random() < 0.08:
        word += rng.choice([".", ",", ";"])
      words.append(word)
      size += len(word) + 1
    return " ".join(words)[:length].capitalize()


def generate_synthetic_aan(output_dir: str | Path, *, num_train: int = 4000, num_eval: int = 500, num_test: int = 500,
                           num_topics: int = 8, min_length: int = 200, max_length: int = 400,
                           topic_share: float = 0.5, seed: int = 0) -> dict[str, Path]:
  """Writes the three TSV files into `output_dir` (atomically) and returns their paths by split."""
  counts = {"train": num_train, "eval": num_eval, "test": num_test}
  for name, value in {**{f"num_{k}": v for k, v in counts.items()}, "min_length": min_length}.items():
    if value < 0:
      raise ValueError(f"{name}={value} must be >= 0")
  if not 0 < min_length <= max_length:
    raise ValueError(f"need 0 < min_length <= max_length, got min_length={min_length}, max_length={max_length}")
  if num_topics < 2:
    raise ValueError(f"num_topics={num_topics} must be >= 2 (negatives pair different topics)")
  if not 0.0 <= topic_share <= 1.0:
    raise ValueError(f"topic_share={topic_share} must be in [0, 1]")
  rng = np.random.default_rng(seed)
  vocabulary = _Vocabulary(rng, num_topics)
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  paths = {}
  for split, count in counts.items():
    labels = np.arange(count) % 2
    rng.shuffle(labels)
    lines = []
    for n, label in enumerate(labels):
      topic1 = int(rng.integers(num_topics))
      topic2 = topic1 if label else int((topic1 + rng.integers(1, num_topics)) % num_topics)
      texts = [vocabulary.document(rng, t, int(rng.integers(min_length, max_length + 1)), topic_share)
               for t in (topic1, topic2)]
      lines.append(f"{label}\tsynthetic-{split}-{2 * n}\tsynthetic-{split}-{2 * n + 1}\t{texts[0]}\t{texts[1]}\n")
    path = output_dir / SPLIT_FILES[split]
    fd, tmp = tempfile.mkstemp(dir=output_dir, suffix=".tsv.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.writelines(lines)
    os.replace(tmp, path)
    paths[split] = path
  return paths
