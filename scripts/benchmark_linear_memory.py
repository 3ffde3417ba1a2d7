r"""Memory of forward+backward `kernels.linear_attention`: xla (chunked) vs reference (quadratic), from XLA's
compiled memory analysis on the current backend (CPU works; nothing is executed).

  python scripts/benchmark_linear_memory.py                       # 8K tokens, batch 1, 8 heads, head dim 64
  python scripts/benchmark_linear_memory.py --lengths=1024,8192,16384 --dtype=bfloat16
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lra import cli  # noqa: E402  (after the path set-up)
from memory_analysis import compiled_memory, mib  # noqa: E402  pylint: disable=g-import-not-at-top

from kernels.linear_attention import linear_attention  # noqa: E402

_LENGTHS = flags.DEFINE_list("lengths", ["8192"], "Sequence lengths.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads.")
_DIM = flags.DEFINE_integer("head_dim", 64, "Feature (and value) dimension per head.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk size of the xla implementation.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")


def forward_backward(implementation: str, causal: bool, chunk_size: int):
  def loss(q, k, v):
    out = linear_attention(q, k, v, causal=causal, implementation=implementation, chunk_size=chunk_size)
    return jnp.sum(out.astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def main(argv):
  del argv
  print(f"backend={jax.default_backend()} batch={_BATCH.value} heads={_HEADS.value} head_dim={_DIM.value} "
        f"chunk={_CHUNK.value} dtype={_DTYPE.value}")
  print("| length | causal | reference total | xla total | xla / reference |")
  print("|---:|:---:|---:|---:|---:|")
  for length in map(int, _LENGTHS.value):
    shape = jax.ShapeDtypeStruct((_BATCH.value, length, _HEADS.value, _DIM.value), jnp.dtype(_DTYPE.value))
    for causal in (True, False):
      ref = compiled_memory(forward_backward("reference", causal, _CHUNK.value), shape, shape, shape)
      xla = compiled_memory(forward_backward("xla", causal, _CHUNK.value), shape, shape, shape)
      print(f"| {length} | {causal} | {mib(ref['total'])} | {mib(xla['total'])} | "
            f"{xla['total'] / ref['total']:.4f} |")


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit status 2
