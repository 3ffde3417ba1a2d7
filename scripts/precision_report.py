r"""bfloat16 against float32, per kernel: the error of a bfloat16 forward+backward relative to float32 (same inputs,
rounded to bfloat16), as the largest absolute error over the largest float32 magnitude and as a relative RMS error.
The numbers in docs/precision.md come from this script (CPU, XLA forms; the Pallas kernels use the same precision
scheme and are checked against the reference in tests/kernels).

  python scripts/precision_report.py                      # linear attention 8K, block-sparse 4K, softmax 2K
  python scripts/precision_report.py --interpret          # also the TPU Pallas kernels in interpret mode (slow)
"""

from __future__ import annotations

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from kernels import block_sparse_attention, linear_attention
from kernels.softmax import softmax_attention
from lra import cli

_INTERPRET = flags.DEFINE_bool("interpret", False, "Also measure the TPU Pallas kernels in interpret mode (1K tokens).")


def _inputs(length: int, positive_qk: bool, heads: int = 2, dim: int = 64, seed: int = 0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  shape = (1, length, heads, dim)
  q, k = jax.random.normal(k1, shape), jax.random.normal(k2, shape)
  if positive_qk:  # feature-mapped inputs of linear attention
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
  return q, k, jax.random.normal(k3, shape), jax.random.normal(k4, shape)


def _errors(got, want) -> tuple[float, float]:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return (float(np.abs(got - want).max() / np.abs(want).max()),
          float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean())))


def measure(fn, q, k, v, ct) -> dict[str, tuple[float, float]]:
  """Errors of the output and of dq, dk, dv: bfloat16 inputs against float32 inputs through the same `fn`."""

  def value_and_grads(q, k, v):
    loss = lambda q, k, v: (lambda out: (jnp.sum(out.astype(jnp.float32) * ct), out))(fn(q, k, v))  # noqa: E731
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out, *grads)

  run = jax.jit(value_and_grads)
  want = run(q, k, v)
  got = run(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  return {name: _errors(g.astype(jnp.float32), w) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}


def cases(interpret: bool):
  block = 64
  n = 4096 // block
  rng = np.random.default_rng(0)
  layout = np.zeros((1, n, n), bool)  # BigBird-like: a 3-block window, 2 global blocks, 2 random blocks per row
  for i in range(n):
    layout[0, i, max(0, i - 1):i + 2] = True
    layout[0, i, rng.choice(n, 2, replace=False)] = True
  layout[0, :2, :] = layout[0, :, :2] = True
  yield ("linear_attention xla, causal, 8K", _inputs(8192, True),
         lambda q, k, v: linear_attention(q, k, v, causal=True, implementation="xla"))
  yield ("linear_attention xla, non-causal, 8K", _inputs(8192, True),
         lambda q, k, v: linear_attention(q, k, v, causal=False, implementation="xla"))
  if interpret:
    yield ("linear_attention pallas (TPU, interpret), causal, 1K", _inputs(1024, True),
           lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=128, implementation="interpret"))
  yield ("block_sparse xla, BigBird-like layout, 4K", _inputs(4096, False),
         lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=block, implementation="xla"))
  yield ("softmax xla (jax.nn.dot_product_attention), causal, 2K", _inputs(2048, False),
         lambda q, k, v: softmax_attention(q, k, v, causal=True, implementation="xla"))


def main(argv):
  del argv
  print(f"backend={jax.default_backend()} jax={jax.__version__}; batch 1, 2 heads, head dim 64; "
        "each cell: max |err| / max |f32|, rms err / rms f32")
  print("| kernel | out | dq | dk | dv |")
  print("|---|---:|---:|---:|---:|")
  for name, (q, k, v, ct), fn in cases(_INTERPRET.value):
    errs = measure(fn, q, k, v, ct)
    cells = " | ".join(f"{m:.1e}, {r:.1e}" for m, r in errs.values())
    print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit status 2
