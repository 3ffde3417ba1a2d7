r"""LRA Image: CIFAR-10 as sequences of 1,024 grayscale pixels (vocabulary 256), 10 classes.

Positions: `pos_encoding="learned"`, as LRA's config; the table is bounded by max_length (`rope`, `alibi`,
`sinusoidal` extrapolate, see docs/results.md).

Defaults are the official LRA Image settings (lra_benchmarks/image/configs/cifar10/base_cifar10_config.py with
transformer_base.py): 1 layer, emb 128, 8 heads, qkv 64, MLP 128 (classifier hidden 128), dropout 0.3, attention
dropout 0.2, CLS pooling, learned positions, batch 256, 35,000 steps (200 epochs of 45,000 images), Adam(b2=0.98,
eps=1e-9), no weight decay, learning rate 5e-4 with one epoch (175 steps) of warmup then cosine decay. Splits: train =
first 90% of the training set, validation = last 10%, test = test. Differences: LRA's cosine ends one warmup later
than the run (a negligible difference); LRA evaluated every epoch, we every 10. Its padding mask `inputs > 0` hid black
pixels; here the mask is all True.

Data: `--config.data.data_dir` = a folder with the CIFAR-10 python pickles (cifar-10-python.tar.gz or its extracted
cifar-10-batches-py/) or class folders {train,test}/<class>/<n>.jpg|png (archive or extracted); without it, TFDS
`cifar10` if tensorflow_datasets is installed. ../shared/data/cifar10 holds a JPEG re-encoding: lossy, so accuracies on
it are close to, not equal to, those on the official data -- say so where you report them.

Command lines:

  # A few minutes on a laptop CPU: small model, few steps.
  python train.py --config configs/lra/image.py:runlocal --workdir runs/image_local --config.data.data_dir=../shared/data/cifar10
  # Full size, any registered attention variant:
  python train.py --config configs/lra/image.py:attention=performer --workdir runs/image_performer \
      --config.data.data_dir=/path/to/cifar10
  python eval.py --workdir runs/image_performer --split test
  # The learning-rate / warmup grid of get_sweep(), one workdir per point:
  python scripts/sweep.py --config configs/lra/image.py --workdir runs/sweep_image \
      --config.data.data_dir=/path/to/cifar10

Protocols (`protocol=paper|small`) and self-pretraining (`pretrain=none|masked|causal`): their sources and
shared settings are documented once in `configs/common.py` (`apply_protocol`, `apply_pretrain`). This task under
`protocol=small`:
  Image: batch 256, 35,000 steps, 175 warmup. Their schedule decays linearly after warmup; ours by
  cosine (the closest schedule here). Published Transformer under it: 37.1 / 65.0 / 79.4 / 38.2 / 74.2
  (ListOps / Text / Retrieval / Image / Pathfinder).

  python train.py --config configs/lra/image.py:protocol=small,pretrain=masked --workdir runs/image_small_spt

Arguments (`key=value` after the colon, comma separated): runlocal, attention=<registered name>,
protocol=paper|small, pretrain=none|masked|causal, patch_size=<p>
(ViT-style p x p patches with CLS pooling, `config.model.patch_size`; p must divide the image side; 1 = pixels):

  python train.py --config configs/lra/image.py:runlocal,patch_size=4 --workdir runs/image_patches4 ...
"""

from __future__ import annotations

import ml_collections

from configs import common

STEPS_PER_EPOCH = 45_000 // 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, common.protocol_args({"patch_size": 1}))
  config = common.make_config(
      "image", attention=args.attention,
      model=dict(num_layers=1, emb_dim=128, num_heads=8, qkv_dim=64, mlp_dim=128, head_mlp_dim=128,
                 dropout_rate=0.3, attention_dropout_rate=0.2, pos_encoding="learned", pooling="cls"),
      data=dict(),
      train=dict(num_steps=200 * STEPS_PER_EPOCH, batch_size=256, learning_rate=5e-4, warmup_steps=STEPS_PER_EPOCH,
                 eval_every_steps=10 * STEPS_PER_EPOCH))

  common.apply_protocol(config, args.protocol, train=dict(batch_size=256, warmup_steps=175, num_steps=35_000))

  if args.runlocal:
    # Two heads and batch 16: softmax over 1,024 x 1,024 scores is the CPU's bottleneck.
    config.model.update(num_layers=1, emb_dim=64, num_heads=2, qkv_dim=64, mlp_dim=128, head_mlp_dim=128,
                        dropout_rate=0.1, attention_dropout_rate=0.0)
    # Evaluations see the first 1,000 images of each split.
    config.train.update(num_steps=300, batch_size=16, eval_batch_size=50, num_eval_batches=20, learning_rate=1e-3,
                        warmup_steps=30, weight_decay=0.0, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
                        log_every_steps=25, eval_every_steps=150, checkpoint_every_steps=150)
  if args.patch_size != 1:
    # ViT: a learned linear embedding per patch, positions over the patch grid, the CLS token pooled.
    config.model.update(patch_size=args.patch_size, pooling="cls")
  return common.apply_pretrain(config, args.pretrain)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Learning rate x warmup around the defaults (x0.5, x1, x2; x1, x5)."""
  return common.lr_warmup_grid(get_config(arg).train, warmup_factors=(1, 5))
