"""Optional TensorFlow Datasets source: used when `config.data.data_dir` is not set and `tensorflow_datasets` is
installed (it is not a dependency of this project)."""

from __future__ import annotations

import importlib.util
from typing import Iterator


def available() -> bool:
  return importlib.util.find_spec("tensorflow_datasets") is not None


def examples(name: str, split: str, data_dir: str | None = None) -> Iterator[dict]:
  """The examples of TFDS dataset `name`, `split` as dicts of numpy values (downloads on first use)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  yield from tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False))
