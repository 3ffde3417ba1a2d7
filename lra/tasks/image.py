"""LRA Image: CIFAR-10 (Krizhevsky 2009) as sequences of 1,024 grayscale pixels, 10 classes.

Splits as in LRA: `train` = the first 90% of the training set, `validation` = its last 10%, `test` = the test set.
Reads, from `config.data.data_dir` (extracted or as .tar.gz archives, see `archive`), whichever it finds first:

* `pickles`: the official python release (`cifar-10-batches-py/data_batch_{1..5}`, `test_batch`; the archive is
  https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz). Training order is data_batch_1..5, as TFDS `cifar10`.
* `class_folders`: `{train,test}/<class name>/<n>.{jpg,png}` (e.g. the JPEG re-encoding in ../shared/data/cifar10;
  JPEG is lossy, so pixels and accuracies differ slightly from the official data: say so where results are reported).
  Training order is by image number, then class, which interleaves the classes so the last 10% holds all of them.

With `data_dir=None` it reads TFDS `cifar10` when `tensorflow_datasets` is installed. Color images become grayscale
as in LRA (`pixels.to_grayscale`); the mask is all True (pixel value 0 is data, not padding).
"""

from __future__ import annotations

import functools
import io
import logging
import pickle
import re
from pathlib import Path
from typing import Callable

import numpy as np

from lra.tasks import archive, cache, pixels, record_checks, tfds_source
from lra.tasks.registry import register

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DOWNLOAD = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TRAIN_FRACTION = 0.9
RELEASE_IMAGES = {"train": 50_000, "test": 10_000}

Raw = dict[str, np.ndarray]  # train_inputs [N, 32, 32] uint8, train_targets [N], test_inputs, test_targets


def _check_split_sizes(raw: Raw, where: str) -> Raw:
  for split in ("train", "test"):
    record_checks.check_count(f"{where} ({split})", f"{split} images", len(raw[f"{split}_targets"]),
                           RELEASE_IMAGES[split], "CIFAR-10")
  return raw


def _unpickle_batch(name: str, content: bytes) -> tuple[np.ndarray, np.ndarray]:
  """One official batch file -> (grayscale uint8 [N, 32, 32], labels [N]); ValueError naming the file if it is not
  a CIFAR-10 batch (the Python 2 pickle of {b"data": uint8 [N, 3072] (R, G, B planes), b"labels": [N ints 0..9]})."""
  expected = "a CIFAR-10 python batch (pickled dict with b'data' uint8 [N, 3072] and b'labels')"
  try:
    batch = pickle.loads(content, encoding="bytes")
  except Exception as e:  # pylint: disable=broad-except  # unpickling garbage can raise almost anything
    raise ValueError(f"{name}: not readable as {expected} ({record_checks.describe_error(e)}); "
                     f"download {DOWNLOAD} again") from None
  if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(f"{name}: expected {expected}, got {keys}")
  data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
    raise ValueError(f"{name}: expected data [N, 3072] and N labels, got data {data.shape} and labels {labels.shape}")
  record_checks.check_labels(name, labels, range(len(CLASSES)), what="label of image")
  rgb = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return pixels.to_grayscale(rgb), labels.astype(np.int32)


def _read_pickles(sources: archive.Sources) -> Raw:
  batches = {}
  for name, match, content in sources.read_named():
    batches[match.group(1)] = _unpickle_batch(name, content)
  missing = sorted(({f"data_batch_{i}" for i in range(1, 6)} | {"test_batch"}) - set(batches))
  if missing:
    raise FileNotFoundError(f"CIFAR-10 pickles {missing} not found under {sources.root}")
  train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
  raw = {"train_inputs": np.concatenate([x for x, _ in train]),
         "train_targets": np.concatenate([y for _, y in train]),
         "test_inputs": batches["test_batch"][0], "test_targets": batches["test_batch"][1]}
  return _check_split_sizes(raw, _where(sources))


def _where(sources: archive.Sources) -> str:
  return ", ".join(map(str, sources.archives)) or str(sources.root)


def _read_class_folders(sources: archive.Sources) -> Raw:
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  rows: dict[str, list] = {"train": [], "test": []}
  for name, match, content in sources.read_named():
    split, class_name, stem = match.group(1), match.group(2), match.group(3)
    if class_name not in CLASSES:
      raise ValueError(f"{name}: unknown CIFAR-10 class folder {class_name!r}; expected one of {', '.join(CLASSES)}")
    try:
      with Image.open(io.BytesIO(content)) as image:
        rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
      raise ValueError(f"{name}: not a readable image ({record_checks.describe_error(e)}); "
                       f"expected a 32x32 JPEG or PNG") from None
    if rgb.shape != (32, 32, 3):
      raise ValueError(f"{name}: expected a 32x32 image, got {rgb.shape[1]}x{rgb.shape[0]}")
    number = int(stem) if stem.isdigit() else -1
    rows[split].append(((number, stem, CLASSES.index(class_name)), pixels.to_grayscale(rgb)))
  out = {}
  for split, items in rows.items():
    if not items:
      raise FileNotFoundError(f"no CIFAR-10 {split} images under {sources.root}")
    items.sort(key=lambda item: item[0])
    out[f"{split}_inputs"] = np.stack([image for _, image in items])
    out[f"{split}_targets"] = np.asarray([key[2] for key, _ in items], np.int32)
  return _check_split_sizes(out, _where(sources))


# Release formats: the path pattern of their files and their reader, tried in this order.
FORMATS: dict[str, tuple[re.Pattern, Callable[[archive.Sources], Raw]]] = {
    "pickles": (re.compile(r"(?:^|/)(data_batch_[1-5]|test_batch)$"), _read_pickles),
    "class_folders": (re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+)\.(?:jpe?g|png)$", re.IGNORECASE),
                      _read_class_folders),
}


def _read_tfds() -> Raw:
  out = {}
  for split in ("train", "test"):
    examples = list(tfds_source.examples("cifar10", split))
    out[f"{split}_inputs"] = pixels.to_grayscale(np.stack([ex["image"] for ex in examples]))
    out[f"{split}_targets"] = np.asarray([ex["label"] for ex in examples], np.int32)
  return _check_split_sizes(out, "tfds cifar10")


@register("image")
class Cifar10(pixels.PixelClassificationTask):
  """Grayscale CIFAR-10 (LRA "Image")."""

  num_classes = 10

  def image_shape(self) -> tuple[int, int]:
    return (32, 32)

  @functools.cached_property
  def raw(self) -> Raw:
    """The train and test sets, read once and cached in `config.data.cache_dir`."""
    data = self.config.data
    folder = cache.cache_dir(data) / "image"
    if data.get("data_dir"):
      path = Path(data.data_dir).expanduser()
      for name, (pattern, reader) in FORMATS.items():
        sources = archive.find(path, pattern)
        if sources:
          key = cache.key_of("cifar10", name, sources.fingerprint())
          logging.info("Image: reading CIFAR-10 %s from %s", name, path)
          return cache.cached_arrays(folder / f"{name}_{key}.npz", functools.partial(reader, sources))
      raise FileNotFoundError(
          f"no CIFAR-10 data under {path}: looked for the python pickles (cifar-10-batches-py/data_batch_1..5, "
          f"test_batch; download {DOWNLOAD}) and for class folders {{train,test}}/<class>/<n>.jpg|png, extracted or "
          f"in a .tar.gz")
    if tfds_source.available():
      return cache.cached_arrays(folder / "tfds_cifar10.npz", _read_tfds)
    raise FileNotFoundError(
        f"config.data.data_dir is not set and tensorflow_datasets is not installed: download {DOWNLOAD} and pass "
        f"--config.data.data_dir=<the folder holding it> (the archive or its extracted cifar-10-batches-py/)")

  def load_split(self, split: str) -> dict[str, np.ndarray]:
    raw = self.raw
    if split == "test":
      return {"inputs": raw["test_inputs"], "targets": raw["test_targets"]}
    cut = int(round(TRAIN_FRACTION * len(raw["train_targets"])))
    part = slice(None, cut) if split == "train" else slice(cut, None)
    return {"inputs": raw["train_inputs"][part], "targets": raw["train_targets"][part]}
