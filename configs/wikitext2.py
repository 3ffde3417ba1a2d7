r"""WikiText-2 word-level language modelling, the benchmark of "Attention Is Not What You Need" (Zhang, 2025).

Defaults are the paper's sizes: d_model 256, d_ff 1024, 6 layers at length 128 (`length=256` gives its 12-layer,
length-256 model), causal pre-LN blocks (`--config.model.post_ln=True` for the paper's post-LN), tied embeddings.
The optimisation settings (AdamW 5e-4, cosine, 1,000 warmup steps, batch 32, 20,000 steps, dropout 0.1) are this
framework's choice, not taken from the paper. The data is not generated: point `data.data_dir` at the folder holding
`wiki.{train,valid,test}.tokens` (or `{train,valid,test}.txt`).

Command lines:

  python train.py --config configs/wikitext2.py:runlocal --workdir runs/wt2_local \
      --config.data.data_dir=../shared/data/wikitext-2
  python train.py --config configs/wikitext2.py:attention=grassmann --workdir runs/wt2_grassmann \
      --config.data.data_dir=/path/to/wikitext-2
  python train.py --config configs/wikitext2.py:length=256 --workdir runs/wt2_256 --config.data.data_dir=...
  # Validation and test perplexity of the best checkpoint:
  python eval.py --workdir runs/wt2_grassmann --split validation,test

Arguments: runlocal, attention=<registered name>, length=128|256.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {"runlocal": False, "attention": "softmax", "length": 128})
  if args.length not in (128, 256):
    raise ValueError(f"length must be 128 or 256 (the paper's two settings), got {args.length}")
  config = common.make_config(
      "wikitext2", attention=args.attention,
      model=dict(num_layers=6 if args.length == 128 else 12, emb_dim=256, num_heads=4, qkv_dim=256, mlp_dim=1024,
                 dropout_rate=0.1, attention_dropout_rate=0.1, pos_encoding="learned", pooling="none",
                 tie_embeddings=True),
      data=dict(max_length=args.length),
      train=dict(num_steps=20_000, learning_rate=5e-4, warmup_steps=1_000, weight_decay=0.01, grad_clip_norm=1.0,
                 log_every_steps=100, eval_every_steps=1_000))

  if args.runlocal:
    config.model.update(num_layers=2, emb_dim=128, num_heads=4, qkv_dim=128, mlp_dim=256)
    config.data.max_length = 64
    config.train.update(num_steps=400, batch_size=16, eval_batch_size=16, learning_rate=2e-3, warmup_steps=40,
                        log_every_steps=50, eval_every_steps=200, checkpoint_every_steps=200)
  return config
