"""LRA ListOps: hierarchical list operations, 10-way classification of the value of a nested expression.

Reads `basic_{train,val,test}.tsv` (header `Source\tTarget`) from `config.data.data_dir`: the LRA release's
`listops-1000/` folder or the output of `scripts/make_listops.py`. With `data_dir=None` the dataset is generated
once with the settings in `config.data.generate` into `config.data.cache_dir`. Tokens are the operators, `]` and
the digits (parentheses carry no information and are dropped, as the length counts of the generator); sequences are
truncated / padded to `config.data.max_length` and the mask comes from the pad token only.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from lra.tasks import cache, listops_generator, record_checks
from lra.tasks.base import ArrayDataset, ClassificationTask
from lra.tasks.registry import register

SPLIT_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv", "test": "basic_test.tsv"}
VOCAB = listops_generator.VOCAB
PAD_ID = 0
TOKEN_IDS = {token: i for i, token in enumerate(VOCAB)}
NUM_CLASSES = 10


def encode(source: str, max_length: int) -> np.ndarray:
  """Token ids of one Source string, truncated / padded with PAD_ID to `max_length`."""
  tokens = listops_generator.tokenize(source)
  try:
    ids = [TOKEN_IDS[t] for t in tokens[:max_length]]
  except KeyError as e:
    raise ValueError(f"unknown ListOps token {e.args[0]!r} in {source[:60]!r}; valid tokens: {VOCAB[1:]}") from None
  out = np.full((max_length,), PAD_ID, np.int16)
  out[:len(ids)] = ids
  return out


def read_tsv(path: Path, max_length: int) -> dict[str, np.ndarray]:
  """Reads one split file into `inputs [N, max_length]` and `targets [N]`.

  Every row must be `Source<TAB>Target` with a non-empty expression of ListOps tokens and a label in 0..9; anything
  else is a ValueError naming the file, the line and the value (a label of 10 would otherwise become a NaN loss).
  """
  inputs, targets, lines = [], [], []
  with open(path, encoding="utf-8", newline="") as f, record_checks.reading(path, "UTF-8 ListOps TSV file"):
    reader = csv.reader(f, delimiter="\t")
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["Source", "Target"]:
      raise ValueError(f"{path}:1: expected a header 'Source<TAB>Target', got {header!r}")
    for row in reader:
      if not row or (len(row) == 1 and not row[0].strip()):
        continue
      line = reader.line_num
      if len(row) != 2:
        text = "\t".join(row)
        raise ValueError(f"{path}:{line}: expected 2 tab-separated columns (Source, Target), got {len(row)}: "
                         f"{text[:80]!r}")
      if not row[0].strip():
        raise ValueError(f"{path}:{line}: empty Source expression")
      try:
        inputs.append(encode(row[0], max_length))
      except ValueError as e:
        raise ValueError(f"{path}:{line}: {e}") from None
      targets.append(record_checks.parse_int(path, line, row[1].strip()))
      lines.append(line)
  if not inputs:
    raise ValueError(f"{path} holds no examples (expected a header line and rows 'Source<TAB>Target')")
  targets_array = np.asarray(targets, np.int64)
  record_checks.check_labels(path, targets_array, range(NUM_CLASSES), np.asarray(lines))
  return {"inputs": np.stack(inputs), "targets": targets_array.astype(np.int32)}


@register("listops")
class ListOps(ClassificationTask):
  """The ListOps task (Nangia & Bowman 2018, LRA settings)."""

  num_classes = NUM_CLASSES
  vocab_size = len(VOCAB)

  def data_dir(self) -> Path:
    """The folder holding the split files, generating them into the cache first when `data_dir` is None."""
    data = self.config.data
    if data.get("data_dir"):
      path = Path(data.data_dir).expanduser()
      return record_checks.release_folder(
          path, SPLIT_FILES.values(), "ListOps files",
          f"Generate them with `python scripts/make_listops.py --output_dir {path}`, point --config.data.data_dir "
          f"at the LRA release's listops-1000 folder, or set --config.data.data_dir=None to generate into the cache "
          f"dir.")
    gen = dict(data.generate)
    path = cache.cache_dir(data) / "listops_generated" / cache.key_of(gen)
    if not all((path / f).exists() for f in SPLIT_FILES.values()):
      logging.info("Generating ListOps %s into %s", gen, path)
      listops_generator.generate_listops(path, progress=True, **gen)
    return path

  def build_dataset(self, split: str) -> ArrayDataset:
    path = self.data_dir() / SPLIT_FILES[split]
    max_length = self.config.data.max_length
    key = cache.key_of("listops", cache.file_fingerprint(path), max_length)
    arrays = cache.cached_arrays(cache.cache_dir(self.config.data) / "listops" / f"{split}_{key}.npz",
                                 lambda: read_tsv(path, max_length))
    # The mask comes from the pad token only (never from input values).
    arrays["mask"] = arrays["inputs"] != PAD_ID
    return ArrayDataset(arrays)
