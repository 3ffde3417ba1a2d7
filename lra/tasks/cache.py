"""Preprocessed arrays are made once and kept in `config.data.cache_dir` as .npz files, keyed by their inputs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "efficient_attention")


def cache_dir(config_data) -> Path:
  """The cache folder from `config.data.cache_dir` (default ~/.cache/efficient_attention), created if missing."""
  path = Path(os.path.expanduser(config_data.get("cache_dir") or DEFAULT_CACHE_DIR))
  path.mkdir(parents=True, exist_ok=True)
  return path


def key_of(*parts: Any) -> str:
  """A short stable hash of JSON-serialisable parts (file paths, sizes, options)."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> tuple[str, int, int]:
  stat = path.stat()
  return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def cached_arrays(path: Path, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Loads `path` if it exists, else calls `make()` and writes its arrays atomically.

  A cache file that cannot be read (e.g. truncated by a full disk) is remade from the data, with a warning naming it.
  """
  if path.exists():
    try:
      with np.load(path) as data:
        return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
      logging.warning("Unreadable cache file %s (%s: %s): remaking it from the data", path, type(e).__name__, e)
  arrays = make()
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
  with os.fdopen(fd, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return arrays
