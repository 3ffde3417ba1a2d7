r"""MQAR recall against decode-state size (the Based paper's "recall vs state size" figure, at this machine's scale).

Trains the `get_sweep()` points of `--config` (configs/mqar.py's `sweep=state_size`: the recurrent variants and softmax
at two model widths) with scripts/sweep.py's runner (finished points are skipped, interrupted ones resume), then
writes `<workdir>/recall_vs_state.md` / `.csv` / `.png`: test accuracy at query positions against the bytes of each
point's decode state, measured from the model itself: the `cache` collection that `init` allocates for the task's
sequence length with `decode=True` (batch 1, all layers, float32; the recurrent family's state does not grow with the
sequence, softmax's KV cache does).

  python scripts/recall_vs_state.py --config configs/mqar.py:runlocal,sweep=state_size --workdir runs/mqar_state
  python scripts/recall_vs_state.py --config configs/mqar.py:runlocal,sweep=state_size --workdir runs/mqar_state \
      --config.train.num_steps=800       # overrides apply to every point
  # The table from the points finished so far (an interrupted sweep), without training:
  python scripts/recall_vs_state.py --config configs/mqar.py:runlocal,sweep=state_size --workdir runs/mqar_state \
      --table_only
  # Other variants at the sweep's settings (here: the gated / delta-rule family at width 64 only):
  python scripts/recall_vs_state.py --config configs/mqar.py:runlocal,sweep=state_size --workdir runs/mqar_state \
      --variants=retnet,gla,mamba2,deltanet,gated_deltanet --widths=64
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lra import cli  # noqa: E402
from configs import common  # noqa: E402

# scripts/sweep.py, the one runner, for its functions: its own flags (--config, --workdir, ...) are dropped so this
# script can define its own.
_BEFORE = set(flags.FLAGS)
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top
for _name in set(flags.FLAGS) - _BEFORE:
  delattr(flags.FLAGS, _name)

_CONFIG = common.DEFINE_config_file("config", None, "configs/mqar.py[:arg] with a state-size get_sweep().",
                                    lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the sweep's points and the table.")
_SPLIT = flags.DEFINE_string("eval_split", "test", "Split evaluated on the best checkpoint after training.")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Only rebuild the table from the points already finished.")
_VARIANTS = flags.DEFINE_list("variants", [], "Attention variants to run instead of the sweep's (each at every other "
                              "setting of the sweep, e.g. its widths): the gated / delta-rule family is "
                              "retnet,gla,mamba2,deltanet,gated_deltanet.")
_WIDTHS = flags.DEFINE_list("widths", [], "Keep only the sweep points of these model widths (model.emb_dim).")
flags.mark_flags_as_required(["config", "workdir"])

COLUMNS = ("attention", "width", "state_bytes", "accuracy", "parameters")


def state_bytes(config) -> int:
  """Bytes of the decode cache (all layers, batch 1) of `config`'s model at its sequence length."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lra import tasks as tasks_lib  # pylint: disable=g-import-not-at-top

  model = tasks_lib.build(config).model()
  model = model.clone(encoder=model.encoder.clone(decode=True))
  key = jax.random.key(0)
  rngs = {"params": key, "attention": key, "dropout": key}
  batch = {"inputs": jnp.zeros((1, config.data.max_length), jnp.int32)}
  shapes = jax.eval_shape(lambda: model.init(rngs, batch))
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes.get("cache", {}))))


def collect(root: Path, points: dict, split: str) -> list[dict[str, Any]]:
  """One row per point: variant, width, state bytes, test accuracy and parameters (None for a point not finished)."""
  rows = []
  for name, (overrides, point_config) in points.items():
    result_path = root / name / "sweep_result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    rows.append({"attention": overrides.get("model.attention.name", point_config.model.attention.name),
                 "width": point_config.model.emb_dim, "state_bytes": state_bytes(point_config),
                 "accuracy": result.get(f"{split} accuracy"), "parameters": result.get("parameters")})
  return sorted(rows, key=lambda r: (r["attention"], r["state_bytes"]))


def select_points(points_spec: list[dict], variants: Sequence[str], widths: Sequence[int]) -> list[dict]:
  """The sweep's points with `variants` in place of its attention names (every other setting kept once per
  variant), restricted to `widths` when given."""
  if variants:
    settings = []
    for point in points_spec:
      rest = {k: v for k, v in point.items() if k != "model.attention.name"}
      if rest not in settings:
        settings.append(rest)
    points_spec = [{"model.attention.name": name, **rest} for name in variants for rest in settings]
  if widths:
    points_spec = [p for p in points_spec if p.get("model.emb_dim") in set(widths)]
  return points_spec


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| attention | width | decode state | test accuracy | parameters |", "|---|---:|---:|---:|---:|"]
  for r in rows:
    accuracy = "not run" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    parameters = "-" if r["parameters"] is None else f"{r['parameters']:,}"
    lines.append(f"| {r['attention']} | {r['width']} | {r['state_bytes']:,} B | {accuracy} | {parameters} |")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  for name in sorted({r["attention"] for r in rows}):
    mine = [r for r in rows if r["attention"] == name and r["accuracy"] is not None]
    ax.plot([r["state_bytes"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=name)
  ax.set_xscale("log")
  ax.set_xlabel("decode state (bytes, all layers, batch 1)")
  ax.set_ylabel("MQAR test accuracy (query positions)")
  ax.set_ylim(0, 1.05)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.suptitle("Recall against state size (MQAR)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  root = Path(_WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  config_arg = flags.FLAGS["config"].config_filename
  points_spec = select_points(sweep.load_sweep(config_arg), _VARIANTS.value, [int(w) for w in _WIDTHS.value])
  if not _TABLE_ONLY.value:
    sweep.run_sweep(_CONFIG.value, points_spec, root, split=_SPLIT.value)
  points = sweep.build_points(_CONFIG.value, points_spec)
  rows = collect(root, points, _SPLIT.value)
  markdown = to_markdown(rows)
  (root / "recall_vs_state.md").write_text(markdown)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  (root / "recall_vs_state.csv").write_text(buffer.getvalue())
  plot(rows, root / "recall_vs_state.png")
  print(markdown, end="")


if __name__ == "__main__":
  cli.run(main)
