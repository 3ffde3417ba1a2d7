r"""Draws a checkpoint's attention weights for one input: a PNG with one panel per layer and head.

  python scripts/plot_attention.py --workdir runs/image_local --split validation --index 3
  python scripts/plot_attention.py --workdir runs/wt2_local --text "the cat sat on the mat" --output cat.png

The input is an example of the task (`--split`, `--index`) or a text (`--text`: whitespace words of a word
vocabulary such as WikiText-2's, or the bytes of a byte-level task). Panels show the weights of each query row (y)
over the keys (x) for the real positions (with the CLS token first where the model pools from it); keys a variant
never lets a query see (block layouts, causal masks) are grey, so a sparse variant's layout is visible.

How the weights are obtained (one forward pass of the trained model, nothing in the layers changes for it):

* The inputs and masks of every attention layer and the outputs of its `query` / `key` projections are captured
  (flax's `capture_intermediates` and `intercept_methods`), and the weights are recomputed from them, purely:
  softmax (with RoPE / ALiBi as the layer applies them); the block-sparse family (local, sparse_transformer,
  longformer, bigbird) as the softmax restricted to the layout the layer built in that pass; the linear family's
  implied weights `phi(q_i)·phi(k_j) / sum_j phi(q_i)·phi(k_j)` where the feature map is deterministic (linear).
* Layers that form their weights themselves (additive, multiplicative) sow them (`intermediates/attention_weights`).

Variants whose mixing is no attention matrix, or whose implied weights need state this script does not rebuild
(grassmann, performer's random features, reformer's hashing, ...), are refused with one line naming the variant.
"""

from __future__ import annotations

import json
import logging as std_logging
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

import attention as attention_lib  # noqa: E402
from attention import linear as linear_lib  # noqa: E402
from attention import positions as positions_lib  # noqa: E402
from kernels.softmax import causal_mask  # noqa: E402
from lra import cli  # noqa: E402
from lra.tasks import byte_tokens  # noqa: E402
from lra.training import Experiment  # noqa: E402
from lra.training import trainer  # noqa: E402

# (weights [B, H, L, S] float32, allowed [B or 1, H or 1, L, S] bool) of one layer.
Weights = tuple[jax.Array, jax.Array]


class Captured:
  """What one attention layer saw in the forward pass: its module (options), input mask, q, k and sown weights."""

  def __init__(self, module: Any, mask: jax.Array | None, length: int):
    self.module, self.mask, self.length = module, mask, length
    self.q = self.k = self.sown = None
    self.layouts: list[np.ndarray] = []


def _key_mask(c: Captured) -> jax.Array:
  mask = jnp.ones((1, c.length), bool) if c.mask is None else c.mask.astype(bool)
  allowed = mask[:, None, None, :]
  if c.module.causal:
    allowed = allowed & causal_mask(c.length, c.length)[None, None]
  return allowed


def _softmax(scores: jax.Array, allowed: jax.Array) -> jax.Array:
  return jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)


def _rotated(c: Captured) -> tuple[jax.Array, jax.Array]:
  q, k = c.q.astype(jnp.float32), c.k.astype(jnp.float32)
  if c.module.positions == "rope":
    q, k = positions_lib.rope(q), positions_lib.rope(k)
  return q, k


def softmax_weights(c: Captured) -> Weights:
  q, k = _rotated(c)
  scores = jnp.einsum("blhd,bshd->bhls", q, k) * q.shape[-1] ** -0.5
  if c.module.positions == "alibi":
    slopes = positions_lib.alibi_slopes(c.module.num_heads)
    scores = scores + positions_lib.alibi_bias(slopes, jnp.arange(c.length), jnp.arange(c.length))
  allowed = _key_mask(c)
  return _softmax(scores, allowed), jnp.broadcast_to(allowed, scores.shape)


def sown_weights(c: Captured) -> Weights:
  weights = c.sown.astype(jnp.float32)
  return weights, jnp.broadcast_to(_key_mask(c), weights.shape)


def block_sparse_weights(c: Captured) -> Weights:
  if not c.layouts:
    raise ValueError(f"{type(c.module).__name__} built no block layout in the forward pass")
  block = c.module.block_size
  layout_HxNxN = np.asarray(c.layouts[-1], bool)
  token_layout = np.repeat(np.repeat(layout_HxNxN, block, axis=1), block, axis=2)[:, :c.length, :c.length]
  allowed = _key_mask(c) & jnp.asarray(token_layout)[None]
  q, k = c.q.astype(jnp.float32), c.k.astype(jnp.float32)
  scores = jnp.einsum("blhd,bshd->bhls", q, k) * q.shape[-1] ** -0.5
  allowed = jnp.broadcast_to(allowed, scores.shape)
  return _softmax(scores, allowed), allowed


def linear_weights(c: Captured) -> Weights:
  phi = linear_lib.FEATURE_MAPS[c.module.feature_map]
  q, k = phi(c.q.astype(jnp.float32)), phi(c.k.astype(jnp.float32))
  allowed = jnp.broadcast_to(_key_mask(c), (q.shape[0], q.shape[2], c.length, c.length))
  similarity = jnp.where(allowed, jnp.einsum("blhf,bshf->bhls", q, k), 0.0)
  return similarity / jnp.maximum(similarity.sum(-1, keepdims=True), 1e-6), allowed


# How each variant's weights are formed; a variant missing here is refused in one line.
WEIGHTS: dict[str, Callable[[Captured], Weights]] = {
    "softmax": softmax_weights,
    "additive": sown_weights,
    "multiplicative": sown_weights,
    "local": block_sparse_weights,
    "sparse_transformer": block_sparse_weights,
    "longformer": block_sparse_weights,
    "bigbird": block_sparse_weights,
    "linear": linear_weights,
}


def check_variant(name: str) -> None:
  if name not in WEIGHTS:
    raise cli.UserError(f"attention {name!r} has no attention weights this script can draw (its mixing is not an "
                        f"attention matrix, or its implied weights need state not rebuilt here); variants with "
                        f"weights: {', '.join(sorted(WEIGHTS))}")


def capture(model: Any, variables: Any, batch: dict[str, Any]) -> list[tuple[str, Captured]]:
  """Runs the model once and returns `(path, Captured)` for every attention layer, in call order."""
  layers: dict[tuple[str, ...], Captured] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, attention_lib.AttentionLayer) and context.method_name == "__call__":
      x = args[0]
      layers.setdefault(module.path, Captured(module.clone(parent=None), kwargs.get("mask", args[1] if len(args) > 1
                                                                                   else None), x.shape[1]))
    out = next_fun(*args, **kwargs)
    if context.method_name == "layout" and module.path in layers:
      layers[module.path].layouts.append(np.asarray(out))
    return out

  def is_projection(module: Any, method_name: str) -> bool:
    return method_name == "__call__" and module.name in ("query", "key") and len(module.path) > 1 and \
        module.path[:-1] in layers

  with nn.intercept_methods(interceptor):
    _, state = model.apply(variables, batch, train=False, capture_intermediates=is_projection,
                           mutable=["intermediates"])
  intermediates = state["intermediates"]
  for path, c in layers.items():
    node = intermediates
    for part in path:
      node = node[part]
    c.q, c.k = node["query"]["__call__"][0], node["key"]["__call__"][0]
    if "attention_weights" in node:
      c.sown = node["attention_weights"][0]
  return [("/".join(path), c) for path, c in layers.items()]


def attention_maps(model: Any, variables: Any, batch: dict[str, Any]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
  """`(layer path, variant, weights [H, L, S], allowed [H, L, S])` of the first example, per attention layer."""
  captured = capture(model, variables, batch)
  names = [attention_lib.base.registered_name(type(c.module)) for _, c in captured]
  for name in dict.fromkeys(names):
    check_variant(name)
  out = []
  for (path, c), name in zip(captured, names):
    weights, allowed = WEIGHTS[name](c)
    real = np.ones(c.length, bool) if c.mask is None else np.asarray(c.mask[0], bool)
    w = np.asarray(weights[0])[:, real][:, :, real]
    a = np.asarray(jnp.broadcast_to(allowed, weights.shape)[0])[:, real][:, :, real]
    out.append((path, name, w, a))
  return out


def draw(maps: list[tuple[str, str, np.ndarray, np.ndarray]], output: Path, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  heads = max(m[2].shape[0] for m in maps)
  fig, axes = plt.subplots(len(maps), heads, figsize=(2.6 * heads, 2.6 * len(maps)), squeeze=False)
  cmap = matplotlib.colormaps["viridis"].copy()
  cmap.set_bad("lightgrey")  # keys the layer never lets the query see
  for row, (path, name, weights, allowed) in enumerate(maps):
    for h in range(heads):
      ax = axes[row][h]
      ax.set_xticks([])
      ax.set_yticks([])
      if h >= weights.shape[0]:
        ax.axis("off")
        continue
      ax.imshow(np.ma.masked_array(weights[h], ~allowed[h]), cmap=cmap, interpolation="nearest", vmin=0.0)
      ax.set_title(f"{path.split('/')[-2] if '/' in path else path} head {h}\n{name}", fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  output.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(output, dpi=100)
  plt.close(fig)


def text_batch(task: Any, text: str, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A one-example batch of `text`: words of the task's vocabulary if it has one, else bytes."""
  vocabulary = getattr(task, "vocabulary", None)
  if vocabulary is not None:
    ids = {w: i for i, w in enumerate(vocabulary)}
    unk = ids.get("<unk>")
    missing = [w for w in text.split() if w not in ids and unk is None]
    if missing:
      raise cli.UserError(f"--text word {missing[0]!r} is not in the task's vocabulary; use known words")
    tokens = np.asarray([[ids.get(w, unk) for w in text.split()]], np.int32)
  else:
    tokens = byte_tokens.encode(text.encode(), int(config.data.max_length))[None]
  dummy = task.dummy_batch(1)
  if "inputs" not in dummy:
    raise cli.UserError(f"task {config.task!r} takes pairs of inputs; draw one of its examples (--split, --index)")
  batch = {"inputs": tokens.astype(dummy["inputs"].dtype)}
  if "mask" in dummy:
    batch["mask"] = tokens != 0 if vocabulary is None else np.ones(tokens.shape, bool)
  return batch


def example_batch(task: Any, split: str, index: int) -> dict[str, np.ndarray]:
  dataset = task.dataset(split)
  if not 0 <= index < len(dataset):
    raise cli.UserError(f"--index={index} is out of range: the {split} split has {len(dataset)} examples")
  example = dataset[index]
  return {k: np.asarray(v)[None] for k, v in example.items() if k not in ("targets", "weights")}


_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder (config.json and checkpoints).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
_SPLIT = flags.DEFINE_string("split", "validation", "Split to take the example from (without --text).")
_INDEX = flags.DEFINE_integer("index", 0, "Example index in --split.", lower_bound=0)
_TEXT = flags.DEFINE_string("text", None, "Draw this text instead of an example (task vocabulary words or bytes).")
_OUTPUT = flags.DEFINE_string("output", None, "PNG path (default <workdir>/attention_<split>_<index>.png).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  for noisy in ("absl", "jax"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  workdir = Path(_WORKDIR.value)
  path = workdir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's folder (it holds config.json)")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  exp = Experiment(config)
  names = sorted({dict(a)["name"] for a in _encoder(exp.model).attention_for_layers()})
  for name in names:  # refuse before restoring or reading data
    check_variant(name)
  checkpoint = int(_CHECKPOINT.value) if _CHECKPOINT.value.isdigit() else _CHECKPOINT.value
  state, meta = trainer.restore_checkpoint(exp, workdir, checkpoint)
  variables = {"params": state.params, **state.model_state}
  batch = text_batch(exp.task, _TEXT.value, config) if _TEXT.value else example_batch(exp.task, _SPLIT.value,
                                                                                        _INDEX.value)
  maps = attention_maps(exp.model, variables, batch)
  source = f"text {_TEXT.value[:40]!r}" if _TEXT.value else f"{_SPLIT.value} example {_INDEX.value}"
  output = Path(_OUTPUT.value) if _OUTPUT.value else workdir / f"attention_{_SPLIT.value}_{_INDEX.value}.png"
  draw(maps, output, f"{config.task}, {', '.join(names)}, step {int(meta['step'])}, {source}")
  print(f"wrote {output} ({len(maps)} layers x {max(m[2].shape[0] for m in maps)} heads)")


def _encoder(model: Any) -> Any:
  encoder = getattr(model, "encoder", None)
  if encoder is None:
    raise cli.UserError(f"{type(model).__name__} has no encoder whose attention could be drawn")
  return encoder


if __name__ == "__main__":
  cli.run(main)
