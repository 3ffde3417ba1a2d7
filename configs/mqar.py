r"""MQAR: multi-query associative recall (Zoology, Arora et al., 2023; Based, Arora et al., 2024).

Defaults are the Zoology paper's main setting: sequences of 256 tokens holding 64 key-value pairs, every key queried
once, vocabulary 8,192, 2 layers of width 128, learned positions, tied embeddings, query placement by Zoology's power
law (a = 0.01) with random filler tokens (lra/tasks/mqar_generator.py says exactly how). Training settings (100k
training examples, AdamW, cosine schedule, 20,000 steps of batch 64) are this framework's choice, not the paper's
learning-rate sweep. `runlocal` shrinks everything (length 64, 8 pairs, vocabulary 128, width 64) so that softmax
attention reaches high recall in a few minutes on 2 CPU cores. The data is generated once into the cache dir.

Command lines:

  python train.py --config configs/mqar.py:runlocal --workdir runs/mqar_local
  python train.py --config configs/mqar.py:runlocal,attention=linear --workdir runs/mqar_local_linear
  python train.py --config configs/mqar.py:attention=based --workdir runs/mqar_based
  # Harder recall at the same length: more pairs per sequence.
  python train.py --config configs/mqar.py --workdir runs/mqar_128kv --config.data.generate.num_kv_pairs=96 \
      --config.data.generate.num_queries=96
  # The recall table of docs/results.md (one run per variant, one table in runs/mqar_table/results.md):
  python scripts/sweep.py --config configs/mqar.py:runlocal --workdir runs/mqar_table \
      --axis model.attention.name=softmax,linear,based,performer,transnormer,grassmann
  python eval.py --workdir runs/mqar_local --split test
  # The learning-rate sweep of get_sweep(), one workdir per point:
  python scripts/sweep.py --config configs/mqar.py:attention=based --workdir runs/sweep_mqar_based
  # Recall against state size (Based's figure at our scale): the recurrent variants and softmax at model widths
  # 32 / 64 (`sweep=state_size`); scripts/recall_vs_state.py trains the points (sweep.py's runner) and writes the
  # table and plot with each point's decode-state bytes (docs/results.md):
  python scripts/recall_vs_state.py --config configs/mqar.py:runlocal,sweep=state_size --workdir runs/mqar_state

Arguments (`key=value` after the colon, comma separated): runlocal, attention=<registered name>, sweep=lr|state_size
(what get_sweep() returns).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, _ARGS)
  config = common.make_config(
      "mqar", attention=args.attention, data_dir=False,
      model=dict(num_layers=2, emb_dim=128, num_heads=2, qkv_dim=128, mlp_dim=512, dropout_rate=0.0,
                 attention_dropout_rate=0.0, pos_encoding="learned", pooling="none", tie_embeddings=True),
      data=dict(max_length=256,  # the sequence length of the generated examples
                generate=dict(vocab_size=8192, num_kv_pairs=64, num_queries=64, placement="power_law",
                              power_a=0.01, filler="random", num_train=100_000, num_val=3_000, num_test=3_000,
                              seed=0)),
      train=dict(num_steps=20_000, batch_size=64, eval_batch_size=128, learning_rate=1e-3, warmup_steps=1_000,
                 weight_decay=0.1, grad_clip_norm=1.0, log_every_steps=100, eval_every_steps=1_000))

  if args.runlocal:
    config.model.update(emb_dim=64, qkv_dim=64, mlp_dim=128)
    config.data.max_length = 64
    config.data.generate.update(vocab_size=128, num_kv_pairs=8, num_queries=8, num_train=20_000, num_val=500,
                                num_test=500)
    config.train.update(num_steps=1_500, batch_size=32, eval_batch_size=100, learning_rate=3e-3, warmup_steps=100,
                        weight_decay=0.01, log_every_steps=50, eval_every_steps=500, checkpoint_every_steps=500)
  return config


_ARGS = {"runlocal": False, "attention": "softmax", "sweep": "lr"}
# Recall against state size: the recurrent family (fixed-size decode state) and softmax (a KV cache of the whole
# sequence), each at these model widths (emb_dim = qkv_dim, MLP twice as wide); the state grows with the width.
STATE_SIZE_VARIANTS = ("softmax", "linear", "transnormer", "grassmann", "based", "performer")  # cheapest first on a CPU
STATE_SIZE_WIDTHS = (32, 64)


def get_sweep(arg: str | None = None) -> list[dict]:
  """`sweep=lr` (default): four learning rates log-spaced from 1e-4 to 1e-2 (Zoology reports each model at the best
  rate of a sweep). `sweep=state_size`: `STATE_SIZE_VARIANTS` x `STATE_SIZE_WIDTHS`."""
  args = common.parse_arg(arg, _ARGS)
  if args.sweep == "lr":
    return common.sweep_grid({"train.learning_rate": [1e-4, 4.6e-4, 2.2e-3, 1e-2]})
  if args.sweep == "state_size":
    return [{"model.attention.name": name, "model.emb_dim": width, "model.qkv_dim": width,
             "model.mlp_dim": 2 * width} for name in STATE_SIZE_VARIANTS for width in STATE_SIZE_WIDTHS]
  raise ValueError(f"sweep={args.sweep!r}; valid choices: lr, state_size")
