r"""Trains a model on a task: `python train.py --config configs/lra/listops.py:runlocal --workdir runs/x`.

Dotted overrides change any config field: `--config.train.num_steps=2000`, `--config.model.attention.name=softmax`.
A workdir with a checkpoint resumes from it.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from lra.training import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every checkpoint step through absl at INFO; keep the run's own lines readable.
  for noisy in ("absl", "jax"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
