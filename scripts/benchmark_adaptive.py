"""Core forward + backward of the content-adaptive sparse attention (nsa, moba) against flash softmax.

    python scripts/benchmark_adaptive.py --lengths=8192,16384,32768 --repeats=1

Causal, batch 1, 8 query heads / 2 key-value heads, head dim 64, float32 (issue 34's setting). Per length and core:
the median wall time of the `value_and_grad` compiled ahead of time (no warm-up call needed), XLA's compiled memory
plan (temporaries, `memory_analysis()` of the same executable), the fraction of key positions a query visits against causal softmax
(`(L + 1) / 2` on average), and the time ratio `time / (fraction x flash time)` (the issue's target: <= 1.5).

- nsa: `attention.nsa.nsa_attention` with the paper's l=32, d=16, l'=64, n=16 (1 initial + 2 local), w=512; the
  compressed tokens are mean-pooled blocks here (`mean_pooled`: the layer's MLP phi is a per-token map outside the
  core), gates 1;
- moba: `attention.adaptive_sparse.selected_attention` on MoBA's gates (`attention.moba.gate_scores`), block 512,
  top-k 3 (MoBA's 8K setting), one selection per query head (MoBA shares none) reading the 2 shared key/value heads
  (the pooled keys are repeated to the 8 query heads for the gates; keys and values are not);
- flash: `kernels.softmax.softmax_attention(causal=True)` (the XLA flash form on CPU), keys and values repeated to
  8 heads.
Prints a markdown table (and writes it with `--out`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import adaptive_sparse as core  # noqa: E402
from attention import moba as moba_lib  # noqa: E402
from attention import nsa as nsa_lib  # noqa: E402
from kernels.softmax import softmax_attention  # noqa: E402

H, HKV, D = 8, 2, 64
NSA = dict(compress_block=32, compress_stride=16, select_block=64, num_selected=16, num_local_blocks=2, window=512)
MOBA = dict(block_size=512, top_k=3)
IMPLEMENTATION = [None]  # the selected branch's form (--implementation; None: the layers' default)


def mean_pooled(x, block: int, stride: int):
  """The mean of every `block` keys starting each `stride` (`block` a multiple of `stride`): the mean of
  `block // stride` consecutive stride-means, so no `[Nc, block]` gather of the keys (whose gradient buffers are
  the harness's, not the attention's)."""
  b, s, g, dim = x.shape
  nc = nsa_lib.num_compressed_tokens(s, block, stride)
  means = jnp.mean(x[:, :(s // stride) * stride].reshape(b, s // stride, stride, g, dim), axis=2)
  m = block // stride
  return sum(means[:, i:i + nc] for i in range(m)) / m


def nsa_core(q, k, v):
  b, s = k.shape[:2]
  l, d = NSA["compress_block"], NSA["compress_stride"]
  nc = nsa_lib.num_compressed_tokens(s, l, d)
  kc, vc = mean_pooled(k, l, d), mean_pooled(v, l, d)
  real = jnp.ones((b, s), bool)
  gates = jnp.ones(q.shape[:3] + (3,), jnp.float32)
  out, _ = nsa_lib.nsa_attention(q, k, v, kc, vc, jnp.ones((b, nc), bool), real, gates, causal=True,
                                 implementation=IMPLEMENTATION[0], **NSA)
  return out


def moba_core(q, k, v):
  b, s = k.shape[:2]
  bs = MOBA["block_size"]
  real = jnp.ones((b, s), bool)
  kmean = jnp.repeat(moba_lib.pooled(k, real, bs), H // HKV, axis=2)  # per query head; keys stay shared
  first = core.first_real_position(real, b, s, bs)
  idx = core.top_blocks(moba_lib.gate_scores(q, kmean, jnp.arange(q.shape[1]), first, block_size=bs, causal=True,
                                             num_keys=s), MOBA["top_k"])
  return core.selected_attention(q, k, v, idx, block_size=bs, causal=True, key_mask_BxS=real, scale=D ** -0.5,
                                 implementation=IMPLEMENTATION[0])


def flash_core(q, k, v):
  return softmax_attention(q, jnp.repeat(k, H // HKV, axis=2), jnp.repeat(v, H // HKV, axis=2), causal=True)


CORES = {"flash": flash_core, "nsa": nsa_core, "moba": moba_core}


def visited_fraction(name: str, length: int) -> float:
  """Key positions visited per query over causal softmax's, averaged over the queries."""
  t = np.arange(length) + 1.0  # keys at or before each query
  if name == "flash":
    return 1.0
  if name == "nsa":
    keys = (np.minimum(NSA["num_selected"] * NSA["select_block"], t) + np.minimum(NSA["window"], t)
            + np.maximum(t - NSA["compress_block"], 0) // NSA["compress_stride"])
  else:
    keys = np.minimum(MOBA["top_k"] * MOBA["block_size"], t)
  return float(keys.sum() / t.sum())


def measure(name: str, length: int, repeats: int) -> dict:
  """Compiled ahead of time (its memory plan read from the same executable), then `repeats` timed calls."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (1, length, H, D))
  k = jax.random.normal(keys[1], (1, length, HKV, D))
  v = jax.random.normal(keys[2], (1, length, HKV, D))
  w = jax.random.normal(keys[3], (1, length, H, D))
  f = jax.value_and_grad(lambda q, k, v, w: jnp.sum(CORES[name](q, k, v) * w), argnums=(0, 1, 2))
  compiled = jax.jit(f).lower(q, k, v, w).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v, w))
    times.append(time.perf_counter() - start)
  return {"time": statistics.median(times), "temp": temp, "fraction": visited_fraction(name, length)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="8192,16384,32768")
  parser.add_argument("--cores", default="flash,nsa,moba")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--out", default=None)
  parser.add_argument("--implementation", default="default", choices=("default", "flex", "xla"),
                      help="the selected branch: the layers' default (the block-major XLA form on CPU), flex with "
                           "traced tile lists, or the block-major XLA form")
  args = parser.parse_args()
  IMPLEMENTATION[0] = None if args.implementation == "default" else args.implementation
  rows = ["| length | core | fwd+bwd s | vs flash | compiled temp MiB | keys visited | time / (fraction x flash) |",
          "|---:|---|---:|---:|---:|---:|---:|"]
  for length in [int(x) for x in args.lengths.split(",")]:
    results = {}
    for name in args.cores.split(","):
      results[name] = r = measure(name, length, args.repeats)
      flash = results.get("flash")
      ratio = f"{r['time'] / flash['time']:.3f}" if flash else "-"
      visited = f"{r['time'] / (r['fraction'] * flash['time']):.2f}" if flash else "-"
      rows.append(f"| {length} | {name} | {r['time']:.2f} | {ratio} | {r['temp'] / 2**20:,.1f} | "
                  f"{r['fraction']:.3f} | {visited} |")
      print(rows[-1], flush=True)
  table = "\n".join(rows)
  print(table)
  if args.out:
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
  main()
