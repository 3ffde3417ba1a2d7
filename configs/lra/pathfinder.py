r"""LRA Pathfinder ("Path"): are the two circles joined by one dashed contour? 32x32 pixels = 1,024 tokens, 2 classes.

Positions: `pos_encoding="lra_sinusoidal"`, the LRA code's fixed table (first half sin, second half cos), not
Vaswani's interleaved `"sinusoidal"`: LRA's numbers were made with it, so reproducing them needs it.

Defaults are the official LRA Pathfinder settings (lra_benchmarks/image/configs/pathfinder32/base_pathfinder32_config.py
with transformer_base.py) on the hardest difficulty, `curv_contour_length_14`: 4 layers, emb 32, 4 heads, qkv 16, MLP 32
(classifier hidden 32), dropout 0.2, attention dropout 0.1, mean pooling, fixed sinusoidal positions, batch 512, 62,400
steps (200 epochs of 160,000 images), Adam(b2=0.98, eps=1e-9), no weight decay, learning rate 1e-3 with one epoch (312
steps) of warmup then cosine decay. 200,000 images split 80/10/10. Differences: LRA evaluated every epoch (we every
10); its padding mask `inputs > 0` hid the black background (here the mask is all True); its cosine ended one warmup
after the run.

Data: `--config.data.data_dir` = the LRA release's lra_release/ folder (holding pathfinder32/) or the output of
`python scripts/make_pathfinder.py`; with `data_dir=None` (the default) the 200,000 images are generated once into the
cache dir (about 40 ms of CPU per image: ~20 minutes on 8 cores; `config.data.generate.num_workers`).

Command lines:

  # A few minutes on a laptop CPU: 4,000 generated images of the easiest difficulty, small model.
  python train.py --config configs/lra/pathfinder.py:runlocal --workdir runs/pathfinder_local
  # Full size, any registered attention variant:
  python train.py --config configs/lra/pathfinder.py:attention=performer --workdir runs/pathfinder_performer
  python train.py --config configs/lra/pathfinder.py --workdir runs/pathfinder --config.data.data_dir=/path/to/lra_release
  python eval.py --workdir runs/pathfinder --split test
  # The learning-rate / warmup grid of get_sweep(), one workdir per point:
  python scripts/sweep.py --config configs/lra/pathfinder.py --workdir runs/sweep_pathfinder

Protocols (`protocol=paper|small`) and self-pretraining (`pretrain=none|masked|causal`): their sources and
shared settings are documented once in `configs/common.py` (`apply_protocol`, `apply_pretrain`). This task under
`protocol=small`:
  Pathfinder: batch 256, 62,400 steps, 312 warmup. Their schedule decays linearly after warmup; ours by
  cosine (the closest schedule here). Published Transformer under it: 37.1 / 65.0 / 79.4 / 38.2 / 74.2
  (ListOps / Text / Retrieval / Image / Pathfinder).

  python train.py --config configs/lra/pathfinder.py:protocol=small,pretrain=masked --workdir runs/pathfinder_small_spt

Arguments (`key=value` after the colon, comma separated): runlocal, attention=<registered name>,
protocol=paper|small, pretrain=none|masked|causal, patch_size=<p>
(ViT-style p x p patches with CLS pooling, `config.model.patch_size`; p must divide the image side; 1 = pixels):

  python train.py --config configs/lra/pathfinder.py:runlocal,patch_size=4 --workdir runs/pathfinder_patches4 ...
"""

from __future__ import annotations

import ml_collections

from configs import common

STEPS_PER_EPOCH = 160_000 // 512


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, common.protocol_args({"patch_size": 1}))
  config = common.make_config(
      "pathfinder", attention=args.attention,
      model=dict(num_layers=4, emb_dim=32, num_heads=4, qkv_dim=16, mlp_dim=32, head_mlp_dim=32,
                 dropout_rate=0.2, attention_dropout_rate=0.1, pos_encoding="lra_sinusoidal", pooling="mean"),
      data=dict(resolution=32,
                difficulty="contour_length_14",  # or "baseline", "contour_length_9" (LRA's easy / intermediate)
                # Used when data_dir is None: the images to generate (lra/tasks/pathfinder_generator.py).
                generate=dict(num_images=200_000, images_per_batch=1000, seed=0, num_workers=None)),
      train=dict(num_steps=200 * STEPS_PER_EPOCH, batch_size=512, learning_rate=1e-3, warmup_steps=STEPS_PER_EPOCH,
                 eval_every_steps=10 * STEPS_PER_EPOCH))

  common.apply_protocol(config, args.protocol, train=dict(batch_size=256, warmup_steps=312, num_steps=62_400))

  if args.runlocal:
    # Two heads and batch 16: softmax over 1,024 x 1,024 scores is the CPU's bottleneck.
    config.model.update(num_layers=2, emb_dim=32, num_heads=2, qkv_dim=32, mlp_dim=64, head_mlp_dim=64,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    config.data.difficulty = "baseline"
    config.data.generate.update(num_images=4000, images_per_batch=250)
    config.train.update(num_steps=300, batch_size=16, eval_batch_size=50, learning_rate=1e-3, warmup_steps=30,
                        b2=0.999, eps=1e-8, grad_clip_norm=1.0, log_every_steps=25, eval_every_steps=150,
                        checkpoint_every_steps=150)
  if args.patch_size != 1:
    # ViT: a learned linear embedding per patch, positions over the patch grid, the CLS token pooled.
    config.model.update(patch_size=args.patch_size, pooling="cls")
  return common.apply_pretrain(config, args.pretrain)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Learning rate x warmup around the defaults (x0.5, x1, x2; x1, x5)."""
  return common.lr_warmup_grid(get_config(arg).train, warmup_factors=(1, 5))
