r"""Per-token decode latency and cache size against context length: softmax's KV cache grows, recurrent states don't.

  python scripts/benchmark_decode.py --output_dir runs/decode_bench
  python scripts/benchmark_decode.py --attention=softmax,linear --lengths=256,4096,65536 --output_dir runs/decode_2

For each variant and context length L the script builds the encoder (causal, `decode=True`, no positional encoding,
sizes from the flags) with its decode cache allocated for L positions (the flax convention: `init` on an input of
the maximum length), then times single-token steps (jitted, the cache donated, median of `--steps` timed steps after
`--warmup`). A softmax step attends over the whole allocated cache, so its cost is that of a context of L tokens;
the recurrent family (linear, performer, transnormer, based, grassmann) keeps a state whose size does not depend on
L. Writes `decode.md` (a table), `decode.csv` and `decode.png` (log-log plots of ms/token and cache bytes against L)
to `--output_dir`. Time on the platform JAX runs on (the table names the device); compare rows of one run only.
"""

from __future__ import annotations

import csv
import logging as std_logging
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from lra import cli  # first: lra refuses another package named attention/kernels/configs (attention/packages.py)
import attention as attention_lib
from lra.models import Encoder

DEFAULT_VARIANTS = ("softmax", "linear", "performer", "transnormer", "based", "grassmann")
COLUMNS = ("attention", "context_length", "ms_per_token", "cache_bytes")


def tree_bytes(tree: Any) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def decoder(name: str, length: int, *, num_layers: int, emb_dim: int, num_heads: int, mlp_dim: int,
            vocab_size: int) -> Encoder:
  """The encoder that decodes with attention `name` and a cache for `length` positions; ValueError if it can't."""
  cls = attention_lib.get_class(name)  # ValueError naming the valid choices
  if not getattr(cls, "supports_decode", False):
    decoding = [n for n in attention_lib.names() if getattr(attention_lib.get_class(n), "supports_decode", False)]
    raise ValueError(f"attention {name} has no decode path; valid choices: {', '.join(decoding)}")
  if length < 1:
    raise ValueError(f"context lengths must be >= 1, got {length}")
  return Encoder(vocab_size=vocab_size, max_length=length, emb_dim=emb_dim, num_layers=num_layers,
                 num_heads=num_heads, qkv_dim=emb_dim, mlp_dim=mlp_dim, dropout_rate=0.0, attention_dropout_rate=0.0,
                 pos_encoding="none", pooling="none", attention=ml_collections.FrozenConfigDict({"name": name}),
                 causal=True, decode=True)


def measure(name: str, length: int, *, batch_size: int = 1, num_layers: int = 2, emb_dim: int = 256,
            num_heads: int = 4, mlp_dim: int = 1024, vocab_size: int = 256, steps: int = 20,
            warmup: int = 3) -> dict[str, Any]:
  """One row: median ms per decoded token and the bytes of the decode cache (all layers) at context `length`."""
  model = decoder(name, length, num_layers=num_layers, emb_dim=emb_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                  vocab_size=vocab_size)
  key = jax.random.key(0)
  rngs = {"params": key, "attention": key, "dropout": key}
  # Under jit only the variables are outputs, so the parallel forward pass on the length-L input is dead code: init
  # costs no O(L^2) work whatever L is.
  variables = jax.jit(lambda: model.init(rngs, jnp.zeros((batch_size, length), jnp.int32)))()
  cache = variables.pop("cache")
  cache_bytes = tree_bytes(cache)

  def step(variables, cache, token_Bx1):
    y, mutated = model.apply({**variables, "cache": cache}, token_Bx1, rngs={"attention": key}, mutable=["cache"])
    return y, mutated["cache"]

  step = jax.jit(step, donate_argnums=1)
  token = jnp.ones((batch_size, 1), jnp.int32)
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    y, cache = step(variables, cache, token)
    jax.block_until_ready((y, cache))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return {"attention": name, "context_length": length, "ms_per_token": 1e3 * statistics.median(times),
          "cache_bytes": cache_bytes}


def markdown(rows: Sequence[dict[str, Any]], device: str) -> str:
  lines = [f"Decode step (batch {rows[0].get('batch_size', 1) if rows else 1}) on {device}", "",
           "| attention | context length | ms / token | cache |", "|---|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['attention']} | {r['context_length']:,} | {r['ms_per_token']:.3f} | "
                 f"{r['cache_bytes'] / 2**20:.3f} MiB ({r['cache_bytes']:,} B) |")
  return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel  (only the plot needs it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_time, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name in dict.fromkeys(r["attention"] for r in rows):
    mine = sorted((r for r in rows if r["attention"] == name), key=lambda r: r["context_length"])
    lengths = [r["context_length"] for r in mine]
    ax_time.plot(lengths, [r["ms_per_token"] for r in mine], marker="o", label=name)
    ax_bytes.plot(lengths, [r["cache_bytes"] for r in mine], marker="o", label=name)
  for ax, ylabel in ((ax_time, "ms per token"), (ax_bytes, "decode cache bytes")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
  ax_bytes.legend()
  fig.suptitle("Decoding: the KV cache grows with the context, recurrent states do not")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(rows: Sequence[dict[str, Any]], output_dir: Path, device: str) -> str:
  output_dir.mkdir(parents=True, exist_ok=True)
  table = markdown(rows, device)
  (output_dir / "decode.md").write_text(table + "\n")
  with open(output_dir / "decode.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  plot(rows, output_dir / "decode.png")
  return table


_ATTENTION = flags.DEFINE_list("attention", list(DEFAULT_VARIANTS), "Attention variants (each must decode).")
_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024", "4096", "16384"], "Context lengths (cache sizes).")
cli.check_flag(_LENGTHS, cli.positive_ints, "comma-separated positive integers")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for decode.md, decode.csv and decode.png.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Sequences decoded together.", lower_bound=1)
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Encoder blocks.", lower_bound=1)
_EMB_DIM = flags.DEFINE_integer("emb_dim", 256, "Model width (also qkv_dim).", lower_bound=1)
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.", lower_bound=1)
_MLP_DIM = flags.DEFINE_integer("mlp_dim", 1024, "MLP hidden width.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed decode steps per point (the median is reported).",
                              lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).", lower_bound=0)
flags.mark_flags_as_required(["output_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for noisy in ("absl", "jax"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  try:
    lengths = [int(x) for x in _LENGTHS.value]
  except ValueError:
    raise ValueError(f"--lengths must be integers, got {_LENGTHS.value}") from None
  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {_STEPS.value} and {_WARMUP.value}")
  for name in _ATTENTION.value:  # validate every variant before timing any
    decoder(name, max(lengths), num_layers=1, emb_dim=_EMB_DIM.value, num_heads=_NUM_HEADS.value, mlp_dim=1,
            vocab_size=2)
  rows = []
  for name in _ATTENTION.value:
    for length in lengths:
      row = measure(name, length, batch_size=_BATCH_SIZE.value, num_layers=_NUM_LAYERS.value,
                    emb_dim=_EMB_DIM.value, num_heads=_NUM_HEADS.value, mlp_dim=_MLP_DIM.value,
                    steps=_STEPS.value, warmup=_WARMUP.value)
      rows.append({**row, "batch_size": _BATCH_SIZE.value})
      print(f"{name:>12} L={length:>7,}: {row['ms_per_token']:.3f} ms/token, cache {row['cache_bytes']:,} B",
            flush=True)
  device = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
  print(write_outputs(rows, Path(_OUTPUT_DIR.value), device))


if __name__ == "__main__":
  cli.run(main)
