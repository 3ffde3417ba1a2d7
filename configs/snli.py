r"""SNLI natural language inference, the second benchmark of "Attention Is Not What You Need" (Zhang, 2025).

A two-tower classifier: one shared encoder (the paper's sizes: d_model 256, d_ff 1024, 6 layers) mean-pools premise
and hypothesis, then `[u, v, u*v, |u-v|]` -> MLP -> 3 classes. The paper's SNLI numbers use a frozen DistilBERT
feature extractor, which this framework does not: its encoder is trained from scratch on word tokens. Optimisation
settings are this framework's choice. The full config expects `snli_1.0_train.jsonl(.gz)` in `data.data_dir` and
stops with a FileNotFoundError naming the path without it.

`runlocal` trains on the dev split (90% train / 10% validation, shuffled with the seed) and reports the official test
split, for machines that only have dev and test: its numbers are not comparable to published SNLI results.

Command lines:

  python train.py --config configs/snli.py:runlocal --workdir runs/snli_local --config.data.data_dir=../shared/data/snli
  python train.py --config configs/snli.py:attention=grassmann --workdir runs/snli_grassmann \
      --config.data.data_dir=/path/to/snli_1.0
  python eval.py --workdir runs/snli_grassmann --split test

Arguments: runlocal, attention=<registered name>.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {"runlocal": False, "attention": "softmax"})
  config = common.make_config(
      "snli", attention=args.attention,
      model=dict(num_layers=6, emb_dim=256, num_heads=4, qkv_dim=256, mlp_dim=1024, head_mlp_dim=512,
                 dropout_rate=0.1, attention_dropout_rate=0.1, pos_encoding="learned", pooling="mean"),
      data=dict(max_length=64, train_source="train", validation_fraction=0.1),
      train=dict(num_steps=20_000, batch_size=64, eval_batch_size=128, learning_rate=5e-4, warmup_steps=1_000,
                 weight_decay=0.01, grad_clip_norm=1.0, log_every_steps=100, eval_every_steps=1_000))

  if args.runlocal:
    config.model.update(num_layers=2, emb_dim=128, num_heads=4, qkv_dim=128, mlp_dim=256, head_mlp_dim=256)
    config.data.update(train_source="dev", max_length=48)
    config.train.update(num_steps=600, batch_size=32, eval_batch_size=200, learning_rate=1e-3, warmup_steps=60,
                        log_every_steps=50, eval_every_steps=200, checkpoint_every_steps=200)
  return config
