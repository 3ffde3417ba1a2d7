r"""LRA Path-X: Pathfinder at 128x128 pixels = 16,384 tokens, 2 classes (every model in the LRA paper failed it).

Positions: `pos_encoding="learned"`, as LRA's config; the table is bounded by max_length (`rope`, `alibi`,
`sinusoidal` extrapolate, see docs/results.md).

Defaults are the official LRA Path-X settings (lra_benchmarks/image/configs/pathfinder128/base_pathfinder128_config.py;
its transformer_base.py changes nothing) on `curv_contour_length_14`: 1 layer, emb 32, 2 heads, qkv 16, MLP 32
(classifier hidden 32), dropout 0.1, attention dropout 0.1, mean pooling, learned positions, batch 64, 500,000 steps
(200 epochs of 160,000 images), Adam(b2=0.98, eps=1e-9), no weight decay, gradient clipping at norm 1, learning rate
1e-3 with one epoch (2,500 steps) of warmup then cosine decay. 200,000 images split 80/10/10. Differences: we evaluate
every 10 epochs (LRA every epoch); the mask is all True (LRA's `inputs > 0` hid the black background).

Data: `--config.data.data_dir` = the LRA release's lra_release/ folder (holding pathfinder128/) or the output of
`python scripts/make_pathfinder.py --resolution 128`; with `data_dir=None` (the default) the images are generated once
into the cache dir (about 40 ms of CPU per image) and cached as 3.3 GB of uint8 arrays.

`runlocal` is a smoke test of the pipeline, not Path-X: 16K-token softmax attention does not fit a laptop CPU, so it
trains a small model on 64x64 images (the LRA pathfinder64 settings, 4,096 tokens, easiest difficulty).

Command lines:

  # A few minutes on a laptop CPU: 64x64 images, tiny model.
  python train.py --config configs/lra/pathx.py:runlocal --workdir runs/pathx_local
  # Full size, any registered attention variant (16K tokens: an efficient variant on an accelerator):
  python train.py --config configs/lra/pathx.py:attention=performer --workdir runs/pathx_performer
  python train.py --config configs/lra/pathx.py --workdir runs/pathx --config.data.data_dir=/path/to/lra_release
  python eval.py --workdir runs/pathx_performer --split test
  # The learning-rate / warmup grid of get_sweep(), one workdir per point:
  python scripts/sweep.py --config configs/lra/pathx.py:attention=performer --workdir runs/sweep_pathx

Arguments (`key=value` after the colon, comma separated): runlocal, attention=<registered name>, protocol=paper
(the small re-run protocol has no Path-X setting), pretrain=none|masked|causal (self-pretraining, as the other
LRA configs: `configs/lra/listops.py` says how).
"""

from __future__ import annotations

import ml_collections

from configs import common

STEPS_PER_EPOCH = 160_000 // 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, common.protocol_args())
  if args.protocol != "paper":
    raise ValueError(f"protocol={args.protocol!r}: Path-X has only the paper's protocol (the small-model re-runs "
                     f"skip Path-X); use protocol=paper")
  config = common.make_config(
      "pathx", attention=args.attention,
      model=dict(num_layers=1, emb_dim=32, num_heads=2, qkv_dim=16, mlp_dim=32, head_mlp_dim=32,
                 dropout_rate=0.1, attention_dropout_rate=0.1, pos_encoding="learned", pooling="mean"),
      data=dict(resolution=128,
                difficulty="contour_length_14",  # or "baseline", "contour_length_9" (LRA's easy / intermediate)
                # Used when data_dir is None: the images to generate (lra/tasks/pathfinder_generator.py).
                generate=dict(num_images=200_000, images_per_batch=1000, seed=0, num_workers=None)),
      train=dict(num_steps=200 * STEPS_PER_EPOCH, batch_size=64, learning_rate=1e-3, warmup_steps=STEPS_PER_EPOCH,
                 grad_clip_norm=1.0, log_every_steps=100, eval_every_steps=10 * STEPS_PER_EPOCH))

  if args.runlocal:
    config.model.update(num_layers=1, emb_dim=32, num_heads=1, qkv_dim=32, mlp_dim=64, head_mlp_dim=64,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    config.data.update(resolution=64, difficulty="baseline")
    config.data.generate.update(num_images=1000, images_per_batch=125)
    # One head, batch 4, evaluations on 40 images of each split: 4,096 x 4,096 softmax scores are heavy on a CPU.
    config.train.update(num_steps=40, batch_size=4, eval_batch_size=4, num_eval_batches=10, learning_rate=1e-3,
                        warmup_steps=4, b2=0.999, eps=1e-8, log_every_steps=10, eval_every_steps=20,
                        checkpoint_every_steps=20)
  return common.apply_pretrain(config, args.pretrain)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Learning rate x warmup around the defaults (x0.5, x1, x2; x1, x5)."""
  return common.lr_warmup_grid(get_config(arg).train, warmup_factors=(1, 5))
