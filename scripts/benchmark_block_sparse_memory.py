r"""XLA's compiled memory of a forward+backward pass: block-sparse ("xla", band layout) vs dense softmax attention.

Nothing runs: each function is lowered and compiled on the current backend (CPU by default) and the figures come from
`compiled.memory_analysis()` (temporaries + arguments + outputs - aliased). The block-sparse layout is a band of
`--band` blocks (each query block sees itself and its neighbours), the pattern of `local` attention.

  python scripts/benchmark_block_sparse_memory.py
  python scripts/benchmark_block_sparse_memory.py --lengths 1024,2048,4096,8192 --heads 8 --head_dim 64 \
      --block_size 64 --band 3
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attention.sparse_layouts import local_layout  # noqa: E402
from attention.softmax import softmax_attention_reference  # noqa: E402
from kernels.block_sparse import block_sparse_attention  # noqa: E402


def _bytes(stats) -> int:
  return (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes)


def compiled_memory(attend, *, length: int, heads: int, head_dim: int, batch: int = 1):
  """`memory_analysis()` of `jit(value_and_grad)` of `sum(attend(q, k, v) * ct)` w.r.t. q, k, v (compile only)."""
  def loss(q, k, v, ct):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) * ct)

  spec = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.float32)
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  return fn.lower(spec, spec, spec, spec).compile().memory_analysis()


def compiled_bytes(*, length: int, heads: int, head_dim: int, block_size: int, band: int,
                   batch: int = 1) -> tuple[int, int]:
  """(dense softmax bytes, block-sparse xla bytes) for one configuration."""
  layout = local_layout(length // block_size, window=band)
  sparse = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=block_size,  # noqa: E731
                                                  implementation="xla")
  dims = dict(length=length, heads=heads, head_dim=head_dim, batch=batch)
  return (_bytes(compiled_memory(softmax_attention_reference, **dims)), _bytes(compiled_memory(sparse, **dims)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated sequence lengths")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--block_size", type=int, default=64)
  parser.add_argument("--band", type=int, default=3, help="blocks in the band (odd)")
  args = parser.parse_args()

  mib = 2.0 ** 20
  print(f"backend={jax.default_backend()} batch={args.batch} heads={args.heads} head_dim={args.head_dim} "
        f"block_size={args.block_size} band={args.band} blocks, float32, value_and_grad w.r.t. q, k, v")
  header = f"{'length':>7} {'implementation':<22} {'temp MiB':>10} {'args MiB':>9} {'out MiB':>8} {'total MiB':>10} " \
           f"{'/ dense':>8}"
  print(header)
  print("-" * len(header))
  for length in (int(s) for s in args.lengths.split(",")):
    layout = local_layout(length // args.block_size, window=args.band)
    dims = dict(length=length, heads=args.heads, head_dim=args.head_dim, batch=args.batch)
    rows = {"dense softmax": softmax_attention_reference}
    for impl in ("reference", "xla"):
      rows[f"block_sparse {impl}"] = (
          lambda q, k, v, impl=impl: block_sparse_attention(q, k, v, layout, block_size=args.block_size,
                                                            implementation=impl))
    dense_total = None
    for name, attend in rows.items():
      stats = compiled_memory(attend, **dims)
      total = _bytes(stats)
      dense_total = dense_total or total
      print(f"{length:>7} {name:<22} {stats.temp_size_in_bytes / mib:>10.1f} "
            f"{stats.argument_size_in_bytes / mib:>9.1f} {stats.output_size_in_bytes / mib:>8.1f} "
            f"{total / mib:>10.1f} {total / dense_total:>8.3f}")


if __name__ == "__main__":
  main()
