r"""XLA's compiled memory of one attention layer's forward+backward: the block-sparse variants against dense softmax.

Nothing runs: each function is lowered and compiled on the current backend (CPU by default) and the figures come from
`compiled.memory_analysis()` (temporaries + arguments + outputs - aliased). Per variant (`local`, `sparse_transformer`,
`longformer`, `bigbird` with their registry defaults) the table gives the layer's memory at each length, its ratio to
the `softmax` layer at the same length and its growth from the first to the last length (4x the length: about 4x is
linear, 16x quadratic).

  python scripts/benchmark_block_sparse_memory.py
  python scripts/benchmark_block_sparse_memory.py --lengths 2048,8192 --variants bigbird,longformer --features 256 \
      --num_heads 4 --batch 1
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

import attention  # noqa: E402
from attention.sparse_layouts import local_layout  # noqa: E402
from kernels.block_sparse import block_sparse_attention  # noqa: E402
from kernels.softmax import softmax_attention_reference  # noqa: E402

VARIANTS = ("local", "sparse_transformer", "longformer", "bigbird")


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
  """(dense softmax bytes, block-sparse xla bytes) of the bare cores, a band layout of `band` blocks."""
  layout = local_layout(length // block_size, window=band)
  sparse = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=block_size,  # noqa: E731
                                                  implementation="xla")
  dims = dict(length=length, heads=heads, head_dim=head_dim, batch=batch)
  return (_bytes(compiled_memory(softmax_attention_reference, **dims)), _bytes(compiled_memory(sparse, **dims)))


def layer_bytes(name: str, *, length: int, features: int = 256, num_heads: int = 4, batch: int = 1,
                **options) -> int:
  """Compiled bytes of `jit(value_and_grad)` of one layer's `sum(layer(x) * ct)` w.r.t. its parameters and `x`
  (a padding mask included, as in training). Compiles, never runs."""
  layer = attention.build(name, num_heads=num_heads, **options)
  x = jax.ShapeDtypeStruct((batch, length, features), jnp.float32)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
  params = jax.eval_shape(layer.init, jax.random.key(0), x)

  def loss(params, x, mask, ct):
    return jnp.sum(layer.apply(params, x, mask=mask) * ct)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return _bytes(fn.lower(params, x, mask, x).compile().memory_analysis())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="2048,8192", help="comma-separated sequence lengths")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated block-sparse variants")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--features", type=int, default=256, help="model width (LRA Text: 256)")
  parser.add_argument("--num_heads", type=int, default=4)
  args = parser.parse_args()
  lengths = [int(s) for s in args.lengths.split(",")]
  variants = [s for s in args.variants.split(",") if s]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f"--variants: unknown {unknown}; valid: {','.join(VARIANTS)}")

  mib = 2.0 ** 20
  dims = dict(features=args.features, num_heads=args.num_heads, batch=args.batch)
  print(f"backend={jax.default_backend()} jax={jax.__version__} batch={args.batch} features={args.features} "
        f"num_heads={args.num_heads}, float32, one layer, value_and_grad w.r.t. parameters and input")
  dense = {n: layer_bytes("softmax", length=n, implementation="reference", **dims) for n in lengths}
  header = "| variant | " + " | ".join(f"{n} MiB | {n} / softmax" for n in lengths) + \
           f" | growth {lengths[0]}->{lengths[-1]} |"
  print(header)
  print("|---" * (2 * len(lengths) + 2) + "|")
  print("| softmax | " + " | ".join(f"{dense[n] / mib:.1f} | 1.000" for n in lengths) +
        f" | {dense[lengths[-1]] / dense[lengths[0]]:.2f}x |")
  for name in variants:
    got = {n: layer_bytes(name, length=n, implementation="xla", **dims) for n in lengths}
    print(f"| {name} | " + " | ".join(f"{got[n] / mib:.1f} | {got[n] / dense[n]:.3f}" for n in lengths) +
          f" | {got[lengths[-1]] / got[lengths[0]]:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
