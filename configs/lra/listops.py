r"""LRA ListOps: 10-way classification of nested MIN/MAX/MED/SUM-MOD expressions, sequences up to 2000 tokens.

Positions: `pos_encoding="learned"`, as LRA's config; the table is bounded by max_length (`rope`, `alibi`,
`sinusoidal` extrapolate, see docs/results.md).

Defaults are the official LRA ListOps settings (lra_benchmarks/listops/configs/base_listops_config.py): 4 layers,
emb 512, MLP 1024, 8 heads, qkv 512, batch 32, 5,000 steps, Adam(b2=0.98) with decoupled weight decay 0.1, base
learning rate 0.05 with linear warmup (1,000 steps) then rsqrt decay -- the LRA schedule multiplies the base rate by
`rsqrt(max(step, warmup))`, so the peak rate is 0.05 / sqrt(1000) ~ 1.6e-3 -- CLS pooling, learned positions,
max length 2000. Data: `data_dir=None` generates the LRA-size dataset (96k/2k/2k, 500 < length < 2000) once into
the cache dir; point `--config.data.data_dir` at the LRA release's `listops-1000/` to use the released files.

Command lines:

  # A few minutes on a laptop CPU: small model, short generated sequences.
  python train.py --config configs/lra/listops.py:runlocal --workdir runs/listops_local
  # Full size, any registered attention variant:
  python train.py --config configs/lra/listops.py:attention=softmax --workdir runs/listops_softmax
  python train.py --config configs/lra/listops.py --workdir runs/listops --config.data.data_dir=/path/to/listops-1000
  # Evaluate the best checkpoint on the test split (writes runs/listops/eval_test.json):
  python eval.py --workdir runs/listops --split test

Protocols (`protocol=paper|small`) and self-pretraining (`pretrain=none|masked|causal`): their sources and
shared settings are documented once in `configs/common.py` (`apply_protocol`, `apply_pretrain`). This task under
`protocol=small`:
  ListOps: batch 32, 5,000 steps, 1,000 warmup. Their schedule decays linearly after warmup; ours by
  cosine (the closest schedule here). Published Transformer under it: 37.1 / 65.0 / 79.4 / 38.2 / 74.2
  (ListOps / Text / Retrieval / Image / Pathfinder).

  python train.py --config configs/lra/listops.py:protocol=small,pretrain=masked --workdir runs/listops_small_spt

Arguments (`key=value` after the colon, comma separated): runlocal, attention=<registered name>,
protocol=paper|small, pretrain=none|masked|causal.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, common.protocol_args())
  config = common.make_config(
      "listops", attention=args.attention,
      model=dict(num_layers=4, emb_dim=512, num_heads=8, qkv_dim=512, mlp_dim=1024, head_mlp_dim=1024,
                 dropout_rate=0.1, attention_dropout_rate=0.1, pos_encoding="learned", pooling="cls"),
      data=dict(max_length=2000,
                # Used when data_dir is None: the LRA generator settings.
                generate=dict(num_train=96_000, num_val=2_000, num_test=2_000, min_length=500, max_length=2000,
                              max_depth=10, max_args=10, seed=0)),
      train=dict(num_steps=5_000, learning_rate=0.05, schedule="rsqrt", warmup_steps=1_000, weight_decay=0.1,
                 eval_every_steps=500))

  common.apply_protocol(config, args.protocol, train=dict(batch_size=32, warmup_steps=1_000, num_steps=5_000))

  if args.runlocal:
    config.model.update(num_layers=2, emb_dim=64, num_heads=4, qkv_dim=64, mlp_dim=128, head_mlp_dim=128,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    config.data.max_length = 128
    config.data.generate.update(num_train=6_000, num_val=500, num_test=500, min_length=20, max_length=128)
    config.train.update(num_steps=600, batch_size=32, eval_batch_size=100, learning_rate=1e-3, schedule="cosine",
                        warmup_steps=60, weight_decay=0.01, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
                        log_every_steps=25, eval_every_steps=200, checkpoint_every_steps=200)
  return common.apply_pretrain(config, args.pretrain)
