"""ListOps generator: a re-implementation of the Long Range Arena "basic" ListOps task.

Follows the semantics of LRA's `lra_benchmarks/data/listops.py`:

* A node at depth `d` (the root is at depth 1) is an operator when `d < max_depth` and a uniform draw
  `r <= VALUE_P` (0.25); otherwise it is a digit 0-9. An operator takes `randint(2, max_args)` arguments
  (both ends inclusive), each a node one level deeper, and one of `[MIN`, `[MAX`, `[MED`, `[SM`.
* The length of a tree is its number of digits plus two per operator (the operator token and `]`): the
  number of tokens once the parentheses are dropped.
* A tree is kept when `min_length < length < max_length` (both strict).
* Sources are written as LRA's `to_string` writes them: the operator and its arguments fold into
  left-branching pairs, `[MAX 2 9]` becomes `( ( ( [MAX 2 ) 9 ) ] )`.
* Targets: MIN, MAX, MED = `int(np.median(args))`, SM = `sum(args) % 10`.

Unlike LRA, randomness comes from a seeded `random.Random`, examples keep the order they were drawn in
(LRA iterated a `set`, whose order depends on the process's hash seed), so files are reproducible from the seed.
The draws happen in the same order as in LRA (r, argument count, arguments, operator; digits), except that a tree
is abandoned as soon as it reaches `max_length` (see `_random_tree`): the kept trees have the same distribution.
"""

from __future__ import annotations

import math
import os
import random
import uuid
from pathlib import Path
from typing import Union

MIN = "[MIN"
MAX = "[MAX"
MED = "[MED"
SUM_MOD = "[SM"
END = "]"
OPERATORS: tuple[str, ...] = (MIN, MAX, MED, SUM_MOD)
VALUES: tuple[int, ...] = tuple(range(10))
# Token vocabulary of the parenthesis-free token stream; id 0 is padding.
VOCAB: tuple[str, ...] = ("<pad>", *OPERATORS, END, *(str(v) for v in VALUES))
# Probability that a node above the depth limit is an operator (LRA: `r <= VALUE_P`).
VALUE_P = 0.25

TASK = "basic"  # LRA's file prefix: basic_train.tsv, basic_val.tsv, basic_test.tsv
SPLITS: tuple[str, ...] = ("train", "val", "test")
HEADER = ("Source", "Target")

# A tree is a digit or (operator, [arguments]).
Tree = Union[int, tuple[str, list["Tree"]]]

# Consecutive in-range duplicates after which the space of distinct trees is taken as exhausted.
_MAX_DUPLICATE_STREAK = 100_000


def random_tree(rng: random.Random, *, max_depth: int = 10, max_args: int = 10) -> tuple[Tree, int]:
  """Draws one tree as LRA does and returns it with its length (digits + 2 per operator)."""
  tree, length = _random_tree(rng, 1, max_depth, max_args, math.inf)
  assert tree is not None  # no length limit, so never cut short
  return tree, length


def _random_tree(
    rng: random.Random, depth: int, max_depth: int, max_args: int, limit: float
) -> tuple[Tree | None, int]:
  """Draws a tree, giving up (tree None) as soon as its length reaches `limit`.

  Giving up early does not change which trees are kept: length only grows while a tree is drawn, so a cut
  tree would have been rejected as too long, and the next tree still starts from fresh independent draws.
  It bounds the cost of each rejected tree, whose size is heavy-tailed (mean ~130 tokens, but 1% are longer
  than 2000), which makes generation several times faster for short windows.
  """
  # `rng.random()` is only drawn above the depth limit, as in LRA, so uncut trees use LRA's draw sequence.
  if depth < max_depth and rng.random() <= VALUE_P:
    num_args = rng.randint(2, max_args)
    args = []
    length = 2
    for _ in range(num_args):
      arg, arg_length = _random_tree(rng, depth + 1, max_depth, max_args, limit - length)
      length += arg_length
      if length >= limit:  # also true whenever the argument itself was cut short
        return None, length
      args.append(arg)
    # LRA picks the operator after its arguments; keep that order so the streams agree.
    return (rng.choice(OPERATORS), args), length
  return rng.choice(VALUES), 1


def to_string(tree: Tree) -> str:
  """The LRA source string: `[OP a b]` written as `( ( ( [OP a ) b ) ] )`."""
  parts: list[str] = []
  _write(tree, parts)
  return " ".join(parts)


def _write(tree: Tree, parts: list[str]) -> None:
  if isinstance(tree, int):
    parts.append(str(tree))
    return
  op, args = tree
  # (((op, a0), a1), END) opens one pair per argument plus one for END, and closes each after its right item.
  parts.extend("(" * (len(args) + 1))
  parts.append(op)
  for arg in args:
    _write(arg, parts)
    parts.append(")")
  parts.append(END)
  parts.append(")")


def to_value(tree: Tree) -> int:
  """The value of a tree, with LRA's operator semantics."""
  if isinstance(tree, int):
    return tree
  op, args = tree
  values = [to_value(arg) for arg in args]
  if op == MIN:
    return min(values)
  if op == MAX:
    return max(values)
  if op == MED:
    # int(np.median(values)) without numpy: digits are non-negative, so truncation is floor division.
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) // 2
  if op == SUM_MOD:
    return sum(values) % 10
  raise ValueError(f"unknown operator {op!r}; valid operators are {OPERATORS}")


def tokenize(source: str) -> list[str]:
  """Tokens of a source string without the parentheses (each token is in `VOCAB`)."""
  return [tok for tok in source.split() if tok != "(" and tok != ")"]


def _achievable_lengths(max_depth: int, max_args: int, limit: int) -> int:
  """Bitset (bit i = length i) of the tree lengths below `limit` that `random_tree` can produce."""
  mask = (1 << limit) - 1
  # No tree has length 2 or 3, so {1} and 4..limit-1 is everything; deeper trees only add lengths.
  everything = (0b10 | (mask >> 4 << 4)) & mask
  below = 0b10  # at the depth limit only a digit (length 1) is possible
  for _ in range(max_depth - 1):
    if below == everything:
      break
    elements = [i for i in range(limit) if below >> i & 1]
    sums = below  # lengths of one argument
    ops = 0
    for num_args in range(2, max_args + 1):
      nxt = 0
      for e in elements:
        nxt |= sums << e
      sums = nxt & mask
      ops |= sums
      # Every argument is >= 1 and a digit has length 1, so once the num_args-sums fill num_args..limit-1,
      # more arguments add nothing new (this also covers an empty `sums`).
      if sums == mask >> num_args << num_args:
        break
    below = (0b10 | (ops << 2)) & mask
  return below


def _check_tree_args(min_length: int, max_length: int, max_depth: int, max_args: int) -> None:
  if min_length < 0:
    raise ValueError(f"min_length={min_length} must be >= 0")
  if max_length < min_length + 2:
    raise ValueError(
        f"max_length={max_length} must be >= min_length + 2 = {min_length + 2}: lengths are kept when "
        "min_length < length < max_length")
  if max_depth < 1:
    raise ValueError(f"max_depth={max_depth} must be >= 1")
  if max_args < 2:
    raise ValueError(f"max_args={max_args} must be >= 2 (an operator takes 2..max_args arguments)")
  # Without this check an impossible window would make the rejection loop spin forever.
  lengths = _achievable_lengths(max_depth, max_args, max_length)
  if not lengths >> (min_length + 1):
    raise ValueError(
        f"no tree with max_depth={max_depth} and max_args={max_args} has a length strictly between "
        f"min_length={min_length} and max_length={max_length}; raise max_depth or max_args, or lower min_length")


def generate_examples(
    num_examples: int,
    *,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> list[tuple[str, int]]:
  """Draws `num_examples` distinct (source, target) pairs with `min_length < length < max_length`.

  Trees are drawn until enough distinct sources have a length in range (rejection sampling, as LRA does), so
  the kept trees have LRA's distribution conditioned on the length window.
  """
  if num_examples < 0:
    raise ValueError(f"num_examples={num_examples} must be >= 0")
  _check_tree_args(min_length, max_length, max_depth, max_args)
  rng = random.Random(seed)
  examples: dict[str, int] = {}  # insertion-ordered: the output order is the draw order
  bar = None
  if progress:
    from tqdm import tqdm  # only needed for the bar
    bar = tqdm(total=num_examples, desc="listops", unit="ex")
  duplicates = 0
  try:
    while len(examples) < num_examples:
      tree, length = _random_tree(rng, 1, max_depth, max_args, max_length)
      if tree is None or length <= min_length:
        continue
      source = to_string(tree)
      if source in examples:
        duplicates += 1
        if duplicates >= _MAX_DUPLICATE_STREAK:
          raise RuntimeError(
              f"found only {len(examples)} distinct trees with {min_length} < length < {max_length}, "
              f"max_depth={max_depth}, max_args={max_args} ({duplicates} duplicates in a row); "
              f"asked for num_examples={num_examples}: widen the length window")
        continue
      duplicates = 0
      examples[source] = to_value(tree)
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  return list(examples.items())


def _write_tsv_tmp(path: Path, rows: list[tuple[str, int]]) -> Path:
  """Writes rows to a temporary file beside `path` and returns the temporary path."""
  # Not tempfile.mkstemp: its files are private (0600); a plain exclusive open keeps the usual umask permissions.
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "x", encoding="utf-8", newline="\n") as f:
      f.write("\t".join(HEADER) + "\n")
      f.writelines(f"{source}\t{target}\n" for source, target in rows)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return tmp


def generate_listops(
    output_dir: str | os.PathLike[str],
    *,
    num_train: int = 96_000,
    num_val: int = 2_000,
    num_test: int = 2_000,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Path]:
  """Generates distinct examples and writes `basic_{train,val,test}.tsv` (LRA's format) into `output_dir`.

  No source appears twice, within or across splits. Returns the written path of each split.
  """
  counts = {"train": num_train, "val": num_val, "test": num_test}
  for split, count in counts.items():
    if count < 0:
      raise ValueError(f"num_{split}={count} must be >= 0")
  _check_tree_args(min_length, max_length, max_depth, max_args)
  examples = generate_examples(
      sum(counts.values()), min_length=min_length, max_length=max_length, max_depth=max_depth,
      max_args=max_args, seed=seed, progress=progress)

  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  paths = {split: output_dir / f"{TASK}_{split}.tsv" for split in SPLITS}
  tmps: dict[str, Path] = {}
  try:
    start = 0
    for split in SPLITS:
      tmps[split] = _write_tsv_tmp(paths[split], examples[start:start + counts[split]])
      start += counts[split]
    # Rename only once every split is on disk, so an interrupted run leaves no half-written set behind.
    for split in SPLITS:
      os.replace(tmps.pop(split), paths[split])
  finally:
    for tmp in tmps.values():
      tmp.unlink(missing_ok=True)
  return paths
