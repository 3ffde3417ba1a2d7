"""LRA Pathfinder and Path-X: is the circle-marked dashed path one contour? Images as pixel sequences, 2 classes.

Pathfinder is 32x32 (1,024 tokens) and Path-X 128x128 (16,384 tokens), both at the hardest LRA difficulty
(`contour_length_14`) by default (`config.data.resolution`, `config.data.difficulty`). Reads the LRA layout

  <data_dir>/pathfinder{N}/curv_<difficulty>/imgs/<batch>/sample_<i>.png
  <data_dir>/pathfinder{N}/curv_<difficulty>/metadata/<batch>.npy

from `config.data.data_dir` (the LRA release's `lra_release/` or the output of `scripts/make_pathfinder.py`; a
`pathfinder{N}/` folder itself works too). Metadata files are text lines `imgs/<batch> sample_<i>.png <i> <label> ...`
as in the LRA release (numpy .npy arrays of the same columns, as the original generator saved them, are read too).
With `data_dir=None` the images are generated once with `config.data.generate` into the cache dir.

Splits as LRA's TFDS slices: examples in metadata order (batches by number, rows in file order), the first 80% train,
the next 10% validation, the last 10% test. Empty image files are skipped, as LRA did. The mask is all True: black
pixels are data (LRA's `inputs > 0` mask hid most of each image).
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import logging
import os
from pathlib import Path

import numpy as np

from lra.tasks import cache, pathfinder_generator, pixels, record_checks
from lra.tasks.registry import register

SPLIT_FRACTIONS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
GENERATE_HINT = ("python scripts/make_pathfinder.py --output_dir {root} --resolution {resolution} "
                 "--difficulties {difficulty}")


def read_metadata(path: Path) -> list[tuple[str, str, int]]:
  """(image folder, file name, label) of each row of one metadata file (text lines or a numpy array).

  Rows need at least 4 columns (folder, file, index, label) and a label of 0 or 1; otherwise a ValueError names the
  file and the line (the row, 1-based, for a numpy file).
  """
  raw = path.read_bytes()
  if raw.startswith(b"\x93NUMPY"):
    try:
      array = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as e:
      raise ValueError(f"{path}: not a readable numpy metadata array ({e}); expected rows of (folder, file, index, "
                       f"label) strings") from None
    rows = [(i + 1, row) for i, row in enumerate(np.atleast_2d(array).tolist())]
  else:
    with record_checks.reading(path, "Pathfinder metadata file (text lines 'imgs/<batch> sample_<i>.png <i> <label>')"):
      text = raw.decode()
    rows = [(i + 1, line.split()) for i, line in enumerate(text.splitlines()) if line.strip()]
  out, labels, lines = [], [], []
  for line, row in rows:
    if len(row) < 4:
      raise ValueError(f"{path}:{line}: expected at least 4 columns (folder, file, index, label), got {len(row)}: "
                       f"{row!r}")
    labels.append(record_checks.parse_int(path, line, str(row[3])))
    lines.append(line)
    out.append((str(row[0]), str(row[1]), labels[-1]))
  record_checks.check_labels(path, np.asarray(labels, np.int64), (0, 1), np.asarray(lines))
  return out


def _batch_order(path: Path) -> tuple:
  return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def metadata_files(folder: Path) -> list[Path]:
  return sorted((folder / "metadata").glob("*.npy"), key=_batch_order)


def _load_image(path: Path, resolution: int) -> np.ndarray | None:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if path.stat().st_size == 0:
    return None
  try:
    with Image.open(path) as image:
      array = np.asarray(image.convert("L"))
  except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
    raise ValueError(f"{path}: not a readable image ({record_checks.describe_error(e)}); expected a "
                     f"{resolution}x{resolution} grayscale PNG: generate or download the data again") from None
  if array.shape != (resolution, resolution):
    raise ValueError(f"{path}: expected a {resolution}x{resolution} image, got {array.shape}")
  return array


def read_folder(folder: Path, resolution: int) -> dict[str, np.ndarray]:
  """`inputs` uint8 `[N, H, W]` and `targets` `[N]` of one difficulty folder, in metadata order."""
  rows = [row for path in metadata_files(folder) for row in read_metadata(path)]
  if not rows:
    raise FileNotFoundError(f"no metadata rows under {folder / 'metadata'}")
  paths = [folder / subdir / name for subdir, name, _ in rows]
  missing = [str(p) for p in paths if not p.exists()]
  if missing:
    raise FileNotFoundError(f"{len(missing)} images listed in {folder / 'metadata'} are missing, e.g. {missing[0]}")
  # PNG decoding releases the GIL: threads are enough.
  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    images = list(pool.map(functools.partial(_load_image, resolution=resolution), paths))
  kept = [i for i, image in enumerate(images) if image is not None]
  if len(kept) < len(images):
    logging.warning("Pathfinder: skipped %d empty image files under %s", len(images) - len(kept), folder)
  return {"inputs": np.stack([images[i] for i in kept]),
          "targets": np.asarray([rows[i][2] for i in kept], np.int32)}


@register("pathfinder")
class Pathfinder(pixels.PixelClassificationTask):
  """Pathfinder (LRA "Path", 32x32 by default)."""

  num_classes = 2

  def image_shape(self) -> tuple[int, int]:
    resolution = self.config.data.resolution
    return (resolution, resolution)

  def folder(self) -> Path:
    """The difficulty folder (`.../pathfinder{N}/curv_<difficulty>`), generating it into the cache if needed."""
    data = self.config.data
    resolution, difficulty = data.resolution, data.difficulty
    subdir = pathfinder_generator.folder_name(difficulty)
    if data.get("data_dir"):
      root = Path(data.data_dir).expanduser()
      candidates = [root / f"pathfinder{resolution}" / subdir, root / subdir]
      for folder in candidates:
        if metadata_files(folder):
          return folder
      hint = GENERATE_HINT.format(root=root, resolution=resolution, difficulty=difficulty)
      raise FileNotFoundError(
          f"no Pathfinder metadata in {candidates[0] / 'metadata'} (nor {candidates[1] / 'metadata'}). Generate the "
          f"data with `{hint}`, point --config.data.data_dir at the LRA release's lra_release/ folder, or set "
          f"--config.data.data_dir=None to generate into the cache dir.")
    generate = dict(data.generate)
    # The number of workers does not change the images.
    key = cache.key_of(resolution, difficulty, {k: v for k, v in generate.items() if k != "num_workers"})
    root = cache.cache_dir(data) / "pathfinder_generated" / key
    logging.info("Pathfinder: generating (or completing) %s %dpx %s into %s", generate, resolution, difficulty, root)
    folders = pathfinder_generator.generate_pathfinder(root, resolution=resolution, difficulties=[difficulty],
                                                       progress=True, **generate)
    return folders[difficulty]

  @functools.cached_property
  def examples(self) -> dict[str, np.ndarray]:
    """All images of the difficulty folder, read once and cached in `config.data.cache_dir`."""
    folder = self.folder()
    fingerprint = [cache.file_fingerprint(p) for p in metadata_files(folder)]
    key = cache.key_of("pathfinder", fingerprint, self.config.data.resolution)
    return cache.cached_arrays(cache.cache_dir(self.config.data) / "pathfinder" / f"{key}.npz",
                               lambda: read_folder(folder, self.config.data.resolution))

  def load_split(self, split: str) -> dict[str, np.ndarray]:
    examples = self.examples
    n = len(examples["targets"])
    lo, hi = SPLIT_FRACTIONS[split]
    part = slice(int(round(lo * n)), int(round(hi * n)))
    return {"inputs": examples["inputs"][part], "targets": examples["targets"][part]}


@register("pathx")
class PathX(Pathfinder):
  """Path-X: Pathfinder at 128x128 (16,384 tokens); its own name so results tables keep it apart."""
