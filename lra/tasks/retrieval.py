"""LRA Retrieval: does one ACL Anthology Network (AAN) paper cite the other? Byte-level document pairs, 2 classes.

Reads the LRA release TSVs `new_aan_pairs.{train,eval,test}.tsv` (no header; columns label, id1, id2, text1, text2)
from `config.data.data_dir`: `lra_release/tsv_data/` of https://storage.googleapis.com/long-range-arena/lra_release.gz
(the original corpus is at http://aan.how/download/). Each document's bytes are tokens (see `byte_tokens`), truncated
/ padded to `config.data.max_length` (4,000 in LRA); masks come from the pad token only.

The model is a real two-tower matcher (`DualEncoderMatcher`): one shared encoder applied to each document, then
`[u, v, u*v, u-v]` -> MLP -> 2 classes. (The released LRA code concatenated only `[u, v]` by default, and after March
2021 silently trained a single-sequence encoder on this task.)

`config.data.synthetic=True` with `data_dir=None` generates a small SYNTHETIC dataset in the same format instead
(`synthetic_aan.py`; for `runlocal` and tests, never a stand-in for reported results).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lra.tasks import byte_tokens, cache, record_checks, synthetic_aan
from lra.tasks.base import ArrayDataset, MatchingTask
from lra.tasks.registry import register

SPLIT_FILES = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv",
               "test": "new_aan_pairs.test.tsv"}
DOWNLOAD = "https://storage.googleapis.com/long-range-arena/lra_release.gz"


def read_pairs(path: Path, max_length: int) -> dict[str, np.ndarray]:
  """`inputs1`, `inputs2` (`[N, max_length]` byte tokens) and `targets` (`[N]`) of one TSV file."""
  texts1, texts2, targets = [], [], []
  with open(path, "rb") as f:
    for line_number, line in enumerate(f, 1):
      line = line.rstrip(b"\r\n")
      if not line:
        continue
      fields = line.split(b"\t", 4)
      if len(fields) != 5:
        raise ValueError(f"{path}:{line_number}: expected 5 tab-separated columns (label, id1, id2, text1, text2), "
                         f"got {len(fields)}")
      try:
        label = float(fields[0])
      except ValueError:
        raise ValueError(f"{path}:{line_number}: label {fields[0][:20]!r} is not a number") from None
      if label not in (0.0, 1.0):
        raise ValueError(f"{path}:{line_number}: label {label} must be 0 or 1")
      targets.append(int(label))
      texts1.append(fields[3])
      texts2.append(fields[4])
  if not targets:
    raise ValueError(f"{path} holds no examples")
  return {"inputs1": byte_tokens.encode_all(texts1, max_length), "inputs2": byte_tokens.encode_all(texts2, max_length),
          "targets": np.asarray(targets, np.int32)}


@register("retrieval")
class Retrieval(MatchingTask):
  """AAN document matching (LRA "Retrieval")."""

  num_classes = 2
  vocab_size = byte_tokens.VOCAB_SIZE

  def data_dir(self) -> Path:
    """The folder holding the three TSV files (generating the synthetic set into the cache dir if asked to)."""
    data = self.config.data
    if data.get("data_dir"):
      return record_checks.release_folder(
          data.data_dir, SPLIT_FILES.values(), "AAN pair files",
          f"They are in lra_release/tsv_data/ of {DOWNLOAD} (point --config.data.data_dir there), or use "
          f"--config.data.synthetic=True with --config.data.data_dir=None for a small synthetic stand-in.")
    if not data.get("synthetic"):
      raise FileNotFoundError(
          f"config.data.data_dir is not set. The AAN pairs new_aan_pairs.{{train,eval,test}}.tsv are in "
          f"lra_release/tsv_data/ of {DOWNLOAD}: pass --config.data.data_dir=/path/to/lra_release/tsv_data. "
          f"(--config.data.synthetic=True generates a small SYNTHETIC stand-in for smoke runs.)")
    settings = dict(data.generate)
    path = cache.cache_dir(data) / "synthetic_aan" / cache.key_of(settings)
    if not all((path / name).exists() for name in SPLIT_FILES.values()):
      logging.info("Generating SYNTHETIC AAN-format pairs %s into %s", settings, path)
      synthetic_aan.generate_synthetic_aan(path, **settings)
    return path

  def build_dataset(self, split: str) -> ArrayDataset:
    path = self.data_dir() / SPLIT_FILES[split]
    max_length = self.config.data.max_length
    key = cache.key_of("aan", cache.file_fingerprint(path), max_length)
    arrays = cache.cached_arrays(cache.cache_dir(self.config.data) / "retrieval" / f"{split}_{key}.npz",
                                 lambda: read_pairs(path, max_length))
    arrays["mask1"] = byte_tokens.padding_mask(arrays["inputs1"])
    arrays["mask2"] = byte_tokens.padding_mask(arrays["inputs2"])
    return ArrayDataset(arrays)
