"""LRA Text: IMDB movie-review sentiment (Maas et al. 2011) at the byte level, 2 classes.

Reads the aclImdb release from `config.data.data_dir`: the archive as shipped (`aclImdb_v1.tar.gz` from
https://ai.stanford.edu/~amaas/data/sentiment/, or any .tar.gz holding
`aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`) or its extracted folder. With `data_dir=None` it reads TFDS
`imdb_reviews` when `tensorflow_datasets` is installed. Each review's bytes are tokens (see `byte_tokens`),
truncated / padded to `config.data.max_length`; the padding mask comes from the pad token only.

Splits: `train` (25,000 reviews) and `test` (25,000). IMDB has no validation split; as in LRA, the test split is the
one evaluated during training (`validation_split = "test"`), so "best checkpoint" means best on test: report the test
accuracy of the last checkpoint (`eval.py --checkpoint latest`) for a number not selected on test. Reviews are in a
fixed shuffled order, so the first batches of a split (`config.train.num_eval_batches`) hold both labels.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import numpy as np

from lra.tasks import archive, byte_tokens, cache, record_checks, tfds_source
from lra.tasks.base import ArrayDataset, ClassificationTask
from lra.tasks.registry import register

REVIEW_PATTERN = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
LABELS = {"neg": 0, "pos": 1}
RATINGS = {"neg": range(1, 5), "pos": range(7, 11)}
RELEASE_REVIEWS = {"train": 25_000, "test": 25_000}
SPLITS = ("train", "test")
DOWNLOAD = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"


def _shuffled(examples: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
  """Sorted by (label, id), then in a fixed random order (the same on every machine)."""
  examples = sorted(examples, key=lambda e: (e[0], e[1]))
  order = np.random.default_rng(0).permutation(len(examples))
  return [examples[i] for i in order]


def _arrays_of(examples: dict[str, list[tuple[int, int, bytes]]], max_length: int) -> dict[str, np.ndarray]:
  out = {}
  for split in SPLITS:
    rows = _shuffled(examples[split])
    out[f"{split}_inputs"] = byte_tokens.encode_all((text for _, _, text in rows), max_length)
    out[f"{split}_targets"] = np.asarray([label for label, _, _ in rows], np.int32)
  return out


def read_aclimdb(sources: archive.Sources, max_length: int) -> dict[str, np.ndarray]:
  """`{split}_inputs [N, max_length]` and `{split}_targets [N]` for train and test from aclImdb files.

  A review's rating (in its file name) must agree with its folder as in the release (pos: 7..10, neg: 1..4), else a
  ValueError names the file; split sizes other than the release's 25,000 / 25,000 are a warning naming the source.
  """
  examples: dict[str, list] = {split: [] for split in SPLITS}
  for name, match, content in sources.read_named():
    split, label, review_id, rating = match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
    if rating not in RATINGS[label]:
      expected = record_checks.describe(RATINGS[label])
      raise ValueError(f"{name}: rating {rating} in a {label}/ folder; expected {expected} "
                       f"(aclImdb: pos reviews are rated 7-10, neg 1-4): a file in the wrong folder?")
    examples[split].append((LABELS[label], review_id, content))
  empty = [split for split in SPLITS if not examples[split]]
  if empty:
    raise FileNotFoundError(f"no {'/'.join(empty)} reviews under {sources.root} (looked for "
                            f"aclImdb/{{train,test}}/{{pos,neg}}/<id>_<rating>.txt, extracted or in a .tar.gz); "
                            f"download {DOWNLOAD}")
  where = ", ".join(map(str, sources.archives)) or str(sources.root)
  for split in SPLITS:
    record_checks.check_count(f"{where} ({split}/)", f"{split} reviews", len(examples[split]), RELEASE_REVIEWS[split],
                           "aclImdb v1")
  return _arrays_of(examples, max_length)


def read_tfds(max_length: int) -> dict[str, np.ndarray]:
  """The same arrays from TFDS `imdb_reviews` (label 1 = positive, as in aclImdb)."""
  examples = {split: [(int(ex["label"]), i, bytes(ex["text"])) for i, ex in
                      enumerate(tfds_source.examples("imdb_reviews", split))] for split in SPLITS}
  for split in SPLITS:
    record_checks.check_count(f"tfds imdb_reviews/{split}", f"{split} reviews", len(examples[split]),
                           RELEASE_REVIEWS[split], "aclImdb v1")
  return _arrays_of(examples, max_length)


@register("text")
class Text(ClassificationTask):
  """Byte-level IMDB (LRA "Text")."""

  num_classes = 2
  vocab_size = byte_tokens.VOCAB_SIZE
  splits = SPLITS
  validation_split = "test"
  eval_splits = ("test",)

  @functools.cached_property
  def arrays(self) -> dict[str, np.ndarray]:
    """Both splits' tokens and labels, read once and cached in `config.data.cache_dir`."""
    data = self.config.data
    max_length = data.max_length
    folder = cache.cache_dir(data) / "text"
    if data.get("data_dir"):
      path = Path(data.data_dir).expanduser()
      sources = archive.find(path, REVIEW_PATTERN)
      if not sources:
        raise FileNotFoundError(
            f"no aclImdb reviews under {path} (looked for aclImdb/{{train,test}}/{{pos,neg}}/<id>_<rating>.txt, "
            f"extracted or in a .tar.gz such as aclImdb_v1.tar.gz); download {DOWNLOAD} into that folder")
      key = cache.key_of("aclimdb", sources.fingerprint(), max_length)
      arrays = cache.cached_arrays(folder / f"aclimdb_{key}.npz", lambda: read_aclimdb(sources, max_length))
    elif tfds_source.available():
      key = cache.key_of("imdb_reviews", max_length)
      arrays = cache.cached_arrays(folder / f"tfds_{key}.npz", lambda: read_tfds(max_length))
    else:
      raise FileNotFoundError(
          f"config.data.data_dir is not set and tensorflow_datasets is not installed: download {DOWNLOAD} and pass "
          f"--config.data.data_dir=<the folder holding it> (the archive or its extracted aclImdb/ folder)")
    logging.info("Text: %s", {k: v.shape for k, v in arrays.items()})
    return arrays

  def build_dataset(self, split: str) -> ArrayDataset:
    arrays = self.arrays
    inputs = arrays[f"{split}_inputs"]
    return ArrayDataset({"inputs": inputs, "mask": byte_tokens.padding_mask(inputs),
                         "targets": arrays[f"{split}_targets"]})
