r"""Trains a model on a task: `python train.py --config configs/lra/listops.py:runlocal --workdir runs/x`.

Dotted overrides change any config field: `--config.train.num_steps=2000`, `--config.model.attention.name=softmax`.
A workdir with a checkpoint resumes from it. SIGTERM/SIGINT saves a checkpoint at the next step and exits (rerun the
same command to resume). Config, flag and data errors print one line `error: ...` and exit with status 2.
"""

import logging as std_logging

from absl import flags, logging

from lra import cli  # first: lra refuses another package named attention/kernels/configs (attention/packages.py)
from configs import common
from lra.training import train_and_evaluate

# Attention-aware: `--config.model.attention.name=X` switches the variant and X's options may follow.
_CONFIG = common.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every checkpoint step through absl at INFO; keep the run's own lines readable.
  for noisy in ("absl", "jax"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
