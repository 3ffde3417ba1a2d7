r"""Draws the block layouts of the sparse attention variants as PNG images (dark = query block attends key block).

  python scripts/plot_layouts.py --out_dir runs/layouts
  python scripts/plot_layouts.py --out_dir runs/layouts --num_blocks 64 --stride 8 --window 5 --seed 3

Writes one image per pattern (`<pattern>.png`, one panel per distinct head) and `all_layouts.png` with every pattern.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attention import sparse_layouts as sl  # noqa: E402


def layouts(args: argparse.Namespace) -> dict[str, np.ndarray]:
  """`{title: [heads, N, N]}` for every pattern with the command-line sizes."""
  n = args.num_blocks
  stride = sl.default_stride(n) if args.stride is None else args.stride
  return {
      f"local (window={args.window})": sl.local_layout(n, window=args.window),
      f"local causal (window={args.window})": sl.local_layout(n, window=args.window, causal=True),
      f"sparse_transformer strided causal (stride={stride})": sl.strided_layout(n, stride=stride),
      f"sparse_transformer fixed causal (stride={stride}, c={args.c})":
          sl.fixed_layout(n, stride=stride, c=args.c),
      f"sparse_transformer fixed bidirectional (stride={stride}, c={args.c})":
          sl.fixed_layout(n, stride=stride, c=args.c, causal=False),
      f"longformer (window={args.window}, global={args.num_global_blocks}, dilation 1 | {args.dilation})":
          sl.longformer_layout(n, window=args.window, num_global_blocks=args.num_global_blocks,
                               dilation=[1, args.dilation]),
      f"bigbird (window={args.window}, global={args.num_global_blocks}, random={args.num_random_blocks}, "
      f"seed={args.seed})":
          sl.bigbird_layout(n, window=args.window, num_global_blocks=args.num_global_blocks,
                            num_random_blocks=args.num_random_blocks, num_heads=2, seed=args.seed),
  }


def _draw(ax, layout_NxN: np.ndarray, title: str) -> None:
  ax.imshow(layout_NxN, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
  ax.set_title(f"{title}\n{layout_NxN.mean():.0%} of blocks", fontsize=8)
  ax.set_xlabel("key block", fontsize=7)
  ax.set_ylabel("query block", fontsize=7)
  ax.tick_params(labelsize=6)


def _panels(title: str, layout_HxNxN: np.ndarray) -> list[tuple[str, np.ndarray]]:
  if layout_HxNxN.shape[0] == 1:
    return [(title, layout_HxNxN[0])]
  return [(f"{title}\nhead {h}", layout_HxNxN[h]) for h in range(layout_HxNxN.shape[0])]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", default="layouts", help="folder for the PNG files")
  parser.add_argument("--num_blocks", type=int, default=32)
  parser.add_argument("--window", type=int, default=3, help="sliding window in blocks (odd)")
  parser.add_argument("--stride", type=int, default=None,
                      help="Sparse Transformer stride l, in blocks (default: round(sqrt(num_blocks)), the paper's l)")
  parser.add_argument("--c", type=int, default=1, help="Sparse Transformer fixed summary blocks per chunk")
  parser.add_argument("--num_global_blocks", type=int, default=2)
  parser.add_argument("--num_random_blocks", type=int, default=3)
  parser.add_argument("--dilation", type=int, default=2, help="Longformer dilation of the second head")
  parser.add_argument("--seed", type=int, default=0, help="BigBird random blocks")
  args = parser.parse_args()

  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  everything = []
  for title, layout in layouts(args).items():
    panels = _panels(title, layout)
    everything += panels
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
    for ax, (panel_title, layout_NxN) in zip(axes[0], panels):
      _draw(ax, layout_NxN, panel_title)
    fig.tight_layout()
    stem = title.split(" (")[0].replace(" ", "_")
    fig.savefig(out_dir / f"{stem}.png", dpi=120)
    plt.close(fig)

  cols = 3
  rows = -(-len(everything) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.4 * rows), squeeze=False)
  for ax in axes.flat[len(everything):]:
    ax.axis("off")
  for ax, (title, layout_NxN) in zip(axes.flat, everything):
    _draw(ax, layout_NxN, title)
  fig.tight_layout()
  fig.savefig(out_dir / "all_layouts.png", dpi=120)
  plt.close(fig)
  print(f"wrote {len(list(out_dir.glob('*.png')))} images to {out_dir}")


if __name__ == "__main__":
  main()
