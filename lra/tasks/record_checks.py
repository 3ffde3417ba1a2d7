"""Record checks shared by the data readers (`lra.tasks.record_checks`; formerly `lra.tasks.validation`, a name now
kept for the data split): one-line errors naming the file, the line, the value and what was expected.

Bad records are `ValueError`s (`"<file>:<line>: label 12 out of range; expected an integer in 0..9"`); files that
cannot be opened as what they claim to be (a corrupt .gz, a truncated .tar.gz, a pickle that is not one) are
`ValueError`s naming the file, the format expected and the fix. The known sizes of release files are checked when the
files are read, and a mismatch is a `DataCountWarning` (also logged) naming the file: the run goes on, but a truncated
download or a different version does not pass unnoticed.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

# What a corrupt or truncated compressed file raises while it is read.
CORRUPT_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, tarfile.TarError)


class DataCountWarning(UserWarning):
  """A release file holds a different number of records than the release is known to have."""


def check_count(path: str | Path, what: str, got: int, expected: int, release: str) -> bool:
  """Warns (and logs) when `got != expected`; True when they agree."""
  if got == expected:
    return True
  message = (f"{path}: {got:,} {what}, but the {release} release has {expected:,}; the file may be truncated, "
             f"modified or of another version, so results are not comparable to published ones")
  logging.warning("%s", message)
  warnings.warn(message, DataCountWarning, stacklevel=2)
  return False


def check_labels(path: str | Path, labels: np.ndarray, valid: Sequence[int] | range, lines: np.ndarray | None = None,
                 what: str = "label") -> None:
  """ValueError naming the first label not in `valid`, with its line (`lines[i]`, else record number i + 1)."""
  labels = np.asarray(labels)
  bad = np.flatnonzero(~np.isin(labels, np.asarray(list(valid))))
  if bad.size:
    i = int(bad[0])
    line = int(lines[i]) if lines is not None else i + 1
    raise ValueError(f"{path}:{line}: {what} {labels[i].item()!r} out of range; expected one of {describe(valid)} "
                     f"({bad.size} bad records in the file)")


def describe(valid: Sequence[int] | range) -> str:
  if isinstance(valid, range) and valid.step == 1 and len(valid) > 2:
    return f"{valid.start}..{valid.stop - 1}"
  return ", ".join(map(str, valid))


def parse_int(path: str | Path, line: int, text: str | bytes, what: str = "label") -> int:
  """An integer field (integral floats such as "1.0" included); ValueError naming file, line and value otherwise."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", "replace")
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not value.is_integer():
    raise ValueError(f"{path}:{line}: {what} {text[:40]!r} is not an integer")
  return int(value)


@contextlib.contextmanager
def reading(path: str | Path, expected: str, fix: str = "download or generate it again") -> Iterator[None]:
  """Turns a corrupt/truncated compressed file or undecodable text met while reading `path` into a one-line
  ValueError naming the file and what it should have been."""
  try:
    yield
  except CORRUPT_ERRORS as e:
    raise ValueError(f"{path}: not a readable {expected} ({describe_error(e)}); {fix}") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text at byte {e.start} ({expected} expected); {fix}") from None


def release_folder(data_dir: str | Path, files: Iterable[str], what: str, how_to_get: str) -> Path:
  """`data_dir` expanded, after checking it holds every one of `files`; otherwise a FileNotFoundError naming the
  missing ones ("<what> not found: ...") and `how_to_get` them."""
  path = Path(data_dir).expanduser()
  missing = [str(path / name) for name in files if not (path / name).exists()]
  if missing:
    raise FileNotFoundError(f"{what} not found: {', '.join(missing)}. {how_to_get}")
  return path


def describe_error(e: BaseException) -> str:
  """`Type: message` on one line (some libraries' messages span lines, e.g. tarfile's per-compression list)."""
  return " ".join(f"{type(e).__name__}: {e}".split())


def open_text(path: Path):
  """A text-mode file object, decompressing `.gz` files (errors surface while reading: use inside `reading`)."""
  if path.suffix == ".gz":
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8", newline="")
