"""Tests for the ListOps generator, checked against an evaluator written here from the task's definition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lra.tasks import listops_generator as lg

_OPS = {"[MIN", "[MAX", "[MED", "[SM"}
_SMALL = dict(min_length=20, max_length=200)


def _evaluate(source: str) -> int:
  """Stack evaluation of a source string's tokens; parentheses carry no meaning and are skipped."""
  stack: list[tuple[str, list[int]]] = []
  result: int | None = None
  for tok in source.split():
    if tok in ("(", ")"):
      continue
    if tok in _OPS:
      stack.append((tok, []))
      continue
    if tok == "]":
      op, args = stack.pop()
      assert len(args) >= 2, f"operator {op} closed with {len(args)} arguments"
      value = {
          "[MIN": lambda a: min(a),
          "[MAX": lambda a: max(a),
          "[MED": lambda a: int(np.median(a)),
          "[SM": lambda a: sum(a) % 10,
      }[op](args)
    else:
      value = int(tok)
      assert 0 <= value <= 9 and tok == str(value), tok
    if stack:
      stack[-1][1].append(value)
    else:
      assert result is None, "more than one top-level expression"
      result = value
  assert not stack and result is not None, "unbalanced expression"
  return result


def _check_pairs(source: str) -> None:
  """Every parenthesised group holds exactly two items (LRA's left-branching pairs)."""
  counts: list[int] = [0]
  for tok in source.split():
    if tok == "(":
      counts.append(0)
    elif tok == ")":
      assert counts.pop() == 2, source
      counts[-1] += 1
    else:
      counts[-1] += 1
  assert counts == [1], source


def _length(source: str) -> int:
  """Values plus two per operator (its token and its `]`)."""
  toks = source.split()
  num_ops = sum(t in _OPS for t in toks)
  assert num_ops == toks.count("]")
  return sum(t.isdigit() for t in toks) + 2 * num_ops


def _read(path: Path) -> list[tuple[str, int]]:
  lines = path.read_text(encoding="utf-8").split("\n")
  assert lines[0] == "Source\tTarget"
  assert lines[-1] == ""  # newline-terminated
  rows = []
  for line in lines[1:-1]:
    source, target = line.split("\t")
    rows.append((source, int(target)))
  return rows


def test_evaluator_on_known_expressions() -> None:
  assert _evaluate("( ( ( [MAX 2 ) 9 ) ] )") == 9
  assert _evaluate("( ( ( [MED 1 ) 4 ) ] )") == 2  # median 2.5 truncates
  assert _evaluate("( ( ( ( [SM 9 ) 8 ) ( ( ( [MIN 7 ) 3 ) ] ) ) ] )") == 0
  assert _evaluate("7") == 7


def test_to_string_writes_lra_pairs() -> None:
  assert lg.to_string(("[MAX", [2, 9])) == "( ( ( [MAX 2 ) 9 ) ] )"
  nested = ("[SM", [1, ("[MIN", [3, 4, 5])])
  assert lg.to_string(nested) == "( ( ( [SM 1 ) ( ( ( ( [MIN 3 ) 4 ) 5 ) ] ) ) ] )"
  assert lg.to_value(nested) == 4
  assert lg.tokenize(lg.to_string(nested)) == ["[SM", "1", "[MIN", "3", "4", "5", "]", "]"]


def test_vocab() -> None:
  assert lg.VOCAB == ("<pad>", "[MIN", "[MAX", "[MED", "[SM", "]", *map(str, range(10)))
  assert lg.END == "]" and set(lg.OPERATORS) == _OPS


def test_files(tmp_path: Path) -> None:
  counts = {"train": 300, "val": 50, "test": 60}
  paths = lg.generate_listops(
      tmp_path / "out", num_train=counts["train"], num_val=counts["val"], num_test=counts["test"], seed=1, **_SMALL)
  assert set(paths) == {"train", "val", "test"}
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]
  sources = []
  for split, path in paths.items():
    assert path == tmp_path / "out" / f"basic_{split}.tsv"
    rows = _read(path)
    assert len(rows) == counts[split]
    for source, target in rows:
      assert target == _evaluate(source), source
      assert _SMALL["min_length"] < _length(source) < _SMALL["max_length"]
      _check_pairs(source)
      toks = lg.tokenize(source)
      assert len(toks) == _length(source) and set(toks) <= set(lg.VOCAB[1:])
      sources.append(source)
  assert len(set(sources)) == len(sources), "duplicate sources across files"
  # The files are consecutive slices of one draw.
  drawn = lg.generate_examples(sum(counts.values()), seed=1, **_SMALL)
  assert [s for s, _ in drawn] == sources


def test_all_operators_and_targets_occur() -> None:
  examples = lg.generate_examples(300, seed=2, **_SMALL)
  first_ops = {lg.tokenize(s)[0] for s, _ in examples}
  assert first_ops == _OPS
  assert {t for _, t in examples} == set(range(10))


def test_seed_determinism(tmp_path: Path) -> None:
  kwargs = dict(num_train=100, num_val=20, num_test=20, **_SMALL)
  a = lg.generate_listops(tmp_path / "a", seed=5, **kwargs)
  b = lg.generate_listops(tmp_path / "b", seed=5, **kwargs)
  c = lg.generate_listops(tmp_path / "c", seed=6, **kwargs)
  for split in a:
    assert a[split].read_bytes() == b[split].read_bytes()
    assert a[split].read_bytes() != c[split].read_bytes()


def test_overwrites_and_leaves_no_temp_files(tmp_path: Path) -> None:
  kwargs = dict(num_train=10, num_val=5, num_test=5, **_SMALL)
  lg.generate_listops(tmp_path, seed=0, **kwargs)
  paths = lg.generate_listops(tmp_path, seed=1, **kwargs)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]
  assert len(_read(paths["train"])) == 10


def test_zero_examples(tmp_path: Path) -> None:
  paths = lg.generate_listops(tmp_path, num_train=3, num_val=0, num_test=0, **_SMALL)
  assert paths["val"].read_text() == "Source\tTarget\n"


def test_default_bounds() -> None:
  examples = lg.generate_examples(5, seed=0)
  assert len(examples) == 5
  for source, target in examples:
    assert 500 < _length(source) < 2000
    assert target == _evaluate(source)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_length=200, max_length=200), "max_length=200"),
        (dict(min_length=300, max_length=200), "max_length=200"),
        (dict(min_length=199, max_length=200), "min_length \\+ 2"),  # no integer strictly between
        (dict(min_length=-1), "min_length=-1"),
        (dict(num_train=-1), "num_train=-1"),
        (dict(num_val=-3), "num_val=-3"),
        (dict(num_test=-2), "num_test=-2"),
        (dict(max_depth=0), "max_depth=0"),
        (dict(max_args=1), "max_args=1"),
        (dict(max_depth=2), "max_depth=2"),  # at most 2 + 10 tokens: 500 < length is impossible
        (dict(max_depth=3, max_args=2, min_length=8, max_length=10), "max_depth=3"),  # lengths 1, 4, 7, 10
    ],
)
def test_argument_validation(tmp_path: Path, kwargs: dict, match: str) -> None:
  with pytest.raises(ValueError, match=match):
    lg.generate_listops(tmp_path / "out", **kwargs)
  assert not (tmp_path / "out").exists()


def test_generate_examples_validation() -> None:
  with pytest.raises(ValueError, match="num_examples=-1"):
    lg.generate_examples(-1)
  with pytest.raises(ValueError, match="max_length=5"):
    lg.generate_examples(1, min_length=10, max_length=5)


def test_exhausted_space_raises() -> None:
  # With max_depth=1 every tree is a single digit: only ten distinct sources exist.
  assert len(lg.generate_examples(10, min_length=0, max_length=2, max_depth=1)) == 10
  with pytest.raises(RuntimeError, match="distinct"):
    lg.generate_examples(11, min_length=0, max_length=2, max_depth=1)
