"""Multi-query associative recall (MQAR; Arora et al., 2023, "Zoology"), generated with numpy.

One example of length `seq_len`:

  positions [0, 2 * num_kv_pairs): the key-value pairs `k_1 v_1 k_2 v_2 ...`;
  positions [2 * num_kv_pairs, seq_len): filler tokens, with `num_queries` of the keys (distinct, in random order)
    placed at query positions. The target at a query position is the value that followed that key in the pairs.

Vocabulary (as Zoology): token 0 is reserved, keys are drawn from `[1, vocab_size // 2)` and values from
`[vocab_size // 2, vocab_size)`, both without replacement within a sequence (keys are unique, so every query has one
answer; values are unique too).

Query placement: the region after the pairs is cut into `(seq_len - 2 * num_kv_pairs) // 2` slots two positions
apart (as Zoology); `placement="power_law"` draws distinct slots with probability proportional to
`power_a * g ** (power_a - 1)` for slot `g = 1, 2, ...` (Zoology's default `power_a = 0.01` favours queries close to
the pairs); `placement="uniform"` draws them uniformly.

Filler (every non-pair, non-query position): `filler="random"` draws tokens uniformly from the vocabulary minus the
sequence's keys and values (Zoology draws from the whole vocabulary; excluding the pair tokens keeps the task free of
distractor keys and of answers leaking into the filler); `filler="zero"` uses token 0.

Invariants (tested): at a query position p, `inputs[p]` is a key that occurs in the pairs exactly once, at an even
position 2i, and `targets[p] == inputs[2i + 1]`; the answer token occurs in `inputs[:p + 1]` only at 2i + 1 (no
leakage), and the key occurs only at 2i and p. Non-query positions have target 0 and `query_mask` False. The arrays
are a deterministic function of the arguments.
"""

from __future__ import annotations

import numpy as np

PLACEMENTS = ("power_law", "uniform")
FILLERS = ("random", "zero")


def check_arguments(*, vocab_size: int, num_kv_pairs: int, num_queries: int, seq_len: int,
                    placement: str = "power_law", power_a: float = 0.01, filler: str = "random") -> None:
  """ValueError naming the first invalid argument, its value and the valid range."""
  if num_kv_pairs < 1:
    raise ValueError(f"num_kv_pairs must be >= 1, got {num_kv_pairs}")
  if not 1 <= num_queries <= num_kv_pairs:
    raise ValueError(f"num_queries must be in [1, num_kv_pairs={num_kv_pairs}] (each query asks a distinct key), "
                     f"got {num_queries}")
  if vocab_size // 2 - 1 < num_kv_pairs:
    raise ValueError(f"vocab_size={vocab_size} has {vocab_size // 2 - 1} key tokens ([1, vocab_size // 2)), fewer "
                     f"than num_kv_pairs={num_kv_pairs}; raise vocab_size to at least {2 * num_kv_pairs + 2}")
  slots = (seq_len - 2 * num_kv_pairs) // 2
  if slots < num_queries:
    raise ValueError(f"seq_len={seq_len} leaves {slots} query slots after {num_kv_pairs} pairs, fewer than "
                     f"num_queries={num_queries}; raise seq_len to at least {2 * num_kv_pairs + 2 * num_queries}")
  if placement not in PLACEMENTS:
    raise ValueError(f"unknown query placement {placement!r}; valid choices: {PLACEMENTS}")
  if placement == "power_law" and not 0.0 < power_a <= 1.0:
    raise ValueError(f"power_a must be in (0, 1], got {power_a}")
  if filler not in FILLERS:
    raise ValueError(f"unknown filler {filler!r}; valid choices: {FILLERS}")
  if filler == "random" and vocab_size - 2 * num_kv_pairs < 2:
    raise ValueError(f"vocab_size={vocab_size} leaves no filler tokens besides the {2 * num_kv_pairs} pair tokens")


def _distinct_rows(rng: np.random.Generator, low: int, high: int, n: int, k: int) -> np.ndarray:
  """`[n, k]` integers in [low, high), distinct within each row (argsort of uniform noise = random permutations)."""
  if high - low <= 4 * k:
    return np.argsort(rng.random((n, high - low)), axis=1)[:, :k] + low
  # Large ranges: draw with replacement and redraw the rows that hold a duplicate (rare when k << high - low).
  out = rng.integers(low, high, size=(n, k))
  while True:
    s = np.sort(out, axis=1)
    bad = np.any(s[:, 1:] == s[:, :-1], axis=1)
    if not bad.any():
      return out
    out[bad] = rng.integers(low, high, size=(int(bad.sum()), k))


def _query_slots(rng: np.random.Generator, n: int, slots: int, num_queries: int, placement: str,
                 power_a: float) -> np.ndarray:
  """`[n, num_queries]` distinct slot indices in [0, slots) (Gumbel top-k = sampling without replacement)."""
  if placement == "uniform":
    log_p = np.zeros(slots)
  else:
    log_p = (power_a - 1.0) * np.log(np.arange(1, slots + 1, dtype=np.float64))
  keys = log_p[None, :] + rng.gumbel(size=(n, slots))
  return np.argsort(-keys, axis=1)[:, :num_queries]


def generate(num_examples: int, *, vocab_size: int, num_kv_pairs: int, num_queries: int, seq_len: int,
             seed: int = 0, placement: str = "power_law", power_a: float = 0.01, filler: str = "random",
             chunk_size: int = 4096) -> dict[str, np.ndarray]:
  """`inputs [N, seq_len]` int32, `targets [N, seq_len]` int32 (0 off queries), `query_mask [N, seq_len]` bool."""
  check_arguments(vocab_size=vocab_size, num_kv_pairs=num_kv_pairs, num_queries=num_queries, seq_len=seq_len,
                  placement=placement, power_a=power_a, filler=filler)
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}")
  rng = np.random.default_rng(seed)
  half = vocab_size // 2
  context = 2 * num_kv_pairs
  slots = (seq_len - context) // 2
  inputs = np.zeros((num_examples, seq_len), np.int32)
  targets = np.zeros((num_examples, seq_len), np.int32)
  query_mask = np.zeros((num_examples, seq_len), bool)
  # Chunks bound the memory of the per-example vocabulary tables used for the filler.
  for start in range(0, num_examples, chunk_size):
    n = min(chunk_size, num_examples - start)
    rows = np.arange(n)[:, None]
    keys = _distinct_rows(rng, 1, half, n, num_kv_pairs)
    values = _distinct_rows(rng, half, vocab_size, n, num_kv_pairs)
    x = np.zeros((n, seq_len), np.int64)
    x[:, 0:context:2], x[:, 1:context:2] = keys, values
    if filler == "random":
      # Uniform over the tokens that are not this sequence's keys or values: the k-th free token of each row.
      used = np.zeros((n, vocab_size), bool)
      used[rows, keys] = used[rows, values] = True
      free = np.argsort(used, axis=1, kind="stable")  # free tokens first, in increasing order
      picks = rng.integers(0, vocab_size - context, size=(n, seq_len - context))
      x[:, context:] = np.take_along_axis(free, picks, axis=1)
    asked = np.argsort(rng.random((n, num_kv_pairs)), axis=1)[:, :num_queries]  # which pairs, distinct
    positions = context + 2 * _query_slots(rng, n, slots, num_queries, placement, power_a)
    x[rows, positions] = keys[rows, asked]
    t = np.zeros((n, seq_len), np.int64)
    t[rows, positions] = values[rows, asked]
    inputs[start:start + n], targets[start:start + n] = x, t
    query_mask[start:start + n][rows, positions] = True
  return {"inputs": inputs, "targets": targets, "query_mask": query_mask}
