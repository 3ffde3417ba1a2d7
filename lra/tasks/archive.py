"""Release files read the same way whether extracted into a folder or still in the archives they ship in.

`find(root, pattern)` looks for files under `root` whose relative path matches `pattern` (`re.search` on a path with
`/` separators, so a pattern anchored as `(?:^|/)train/...` matches at any depth). Extracted files win: archives
(`.tar.gz`, `.tgz`, `.tar`) under `root` are only opened when no extracted file matches, so an archive extracted next
to itself is not read twice. An archive that cannot be read (corrupt, truncated, not a tar) is a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

from lra.tasks import record_checks

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclasses.dataclass(frozen=True)
class Sources:
  """Where matching files are: extracted `files`, or else the `archives` to scan."""

  root: Path
  pattern: re.Pattern
  files: tuple[Path, ...] = ()
  archives: tuple[Path, ...] = ()

  def __bool__(self) -> bool:
    return bool(self.files or self.archives)

  def fingerprint(self) -> list:
    """(path, size, mtime) of every file read: a cache key that changes when the data does."""
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (*self.files, *self.archives)]

  def read(self) -> Iterator[tuple[re.Match, bytes]]:
    """(match of the relative path, file content) for each matching file, in path order within each source."""
    for _, match, content in self.read_named():
      yield match, content

  def read_named(self) -> Iterator[tuple[str, re.Match, bytes]]:
    """As `read`, with the name to quote in errors first: the file's path, or `<archive>:<member>`."""
    for path in self.files:
      yield str(path), self.pattern.search(path.relative_to(self.root).as_posix()), path.read_bytes()
    for archive in self.archives:
      with _open_tar(archive) as tar, _reading(archive):
        for member in tar:
          match = self.pattern.search(member.name) if member.isfile() else None
          if match:
            yield f"{archive}:{member.name}", match, tar.extractfile(member).read()


def _walk(root: Path) -> Iterator[Path]:
  for directory, _, names in os.walk(root, followlinks=True):
    for name in sorted(names):
      yield Path(directory) / name


@contextlib.contextmanager
def _reading(archive: Path) -> Iterator[None]:
  """A corrupt or truncated archive met while reading -> ValueError naming it and what was expected."""
  try:
    yield
  except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise ValueError(f"{archive}: not a readable tar archive ({record_checks.describe_error(e)}); expected a complete "
                     f"{'/'.join(ARCHIVE_SUFFIXES)} file: download it again or extract it next to itself") from None


def _open_tar(archive: Path) -> tarfile.TarFile:
  with _reading(archive):
    return tarfile.open(archive, "r:*")


def _has_match(archive: Path, pattern: re.Pattern) -> bool:
  with _open_tar(archive) as tar, _reading(archive):
    return any(member.isfile() and pattern.search(member.name) for member in tar)


def find(root: str | Path, pattern: str | re.Pattern) -> Sources:
  """The sources of files under `root` matching `pattern` (empty if none, or if `root` does not exist).

  `root` may also be an archive. Archives are listed only if they hold a matching file (listing a .tar.gz reads it).
  """
  root = Path(root).expanduser()
  pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
  if root.is_file():
    archives = (root,) if root.name.endswith(ARCHIVE_SUFFIXES) and _has_match(root, pattern) else ()
    return Sources(root.parent, pattern, archives=archives)
  if not root.is_dir():
    return Sources(root, pattern)
  files, archives = [], []
  for path in _walk(root):
    if pattern.search(path.relative_to(root).as_posix()):
      files.append(path)
    elif path.name.endswith(ARCHIVE_SUFFIXES):
      archives.append(path)
  if files:
    return Sources(root, pattern, files=tuple(sorted(files)))
  return Sources(root, pattern, archives=tuple(a for a in sorted(archives) if _has_match(a, pattern)))
