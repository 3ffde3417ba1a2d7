"""The one table writer of the scripts (benchmark.py, sweep.py, lra_table.py): markdown and CSV from rows.

A row is a mapping from column name to value; the columns are given, or every key in the order rows first show it.
Cells are formatted once here (None -> empty, ints with thousands separators, floats to 4 significant digits), so
the same figure reads the same in every table the project prints. A script that needs its own cell text (a ratio
with the published figure beside it) passes strings.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Every key of `rows`, in the order they first appear."""
  return list(dict.fromkeys(k for r in rows for k in r))


def cell(value: Any, missing: str = "") -> str:
  """The text of one markdown cell."""
  if value is None:
    return missing
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    return f"{value:.4g}"
  # A '|' inside a cell would split it: markdown has no escape that every renderer honours, so it becomes '/'.
  return str(value).replace("|", "/").replace("\n", " ")


def markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
             align: Mapping[str, str] | None = None, missing: str = "") -> str:
  """A markdown table (no trailing newline). `align` maps a column to "right" (numbers) or "left" (the default)."""
  columns = list(columns) if columns is not None else columns_of(rows)
  align = align or {}
  rule = "|" + "".join("---:|" if align.get(c) == "right" else "---|" for c in columns)
  lines = ["| " + " | ".join(columns) + " |", rule]
  lines += ["| " + " | ".join(cell(r.get(c), missing) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
  """CSV with a header line; None is an empty field (machine-readable: numbers unformatted)."""
  columns = list(columns) if columns is not None else columns_of(rows)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
  writer.writeheader()
  for r in rows:
    writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
  return buffer.getvalue()


def write(rows: Sequence[Mapping[str, Any]], markdown_path: str | Path | None, csv_path: str | Path | None, *,
          columns: Sequence[str] | None = None, align: Mapping[str, str] | None = None,
          before: str = "", after: str = "") -> str:
  """Writes the markdown table (with `before` / `after` text around it) and the CSV; returns the markdown."""
  text = before + markdown(rows, columns, align=align) + "\n" + after
  if markdown_path is not None:
    Path(markdown_path).write_text(text)
  if csv_path is not None:
    Path(csv_path).write_text(csv_text(rows, columns))
  return text
