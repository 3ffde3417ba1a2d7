r"""Evaluates a checkpoint: `python eval.py --workdir runs/x --split test [--config ...] [--checkpoint latest]`.

Without --config the run's own `<workdir>/config.json` is used. Writes `<workdir>/eval_<split>.json` for each split
(`--split validation,test` evaluates both).
"""

import json
import logging as std_logging
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from lra.training import evaluate_checkpoint

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default: <workdir>/config.json).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_SPLIT = flags.DEFINE_list("split", ["test"], "Split(s) to evaluate, comma separated (validation,test).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every checkpoint step through absl at INFO; keep the run's own lines readable.
  for noisy in ("absl", "jax"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  config = _CONFIG.value
  if config is None:
    path = Path(_WORKDIR.value) / "config.json"
    if not path.exists():
      raise app.UsageError(f"{path} not found: pass --config or point --workdir at a training run")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  checkpoint = int(_CHECKPOINT.value) if _CHECKPOINT.value.isdigit() else _CHECKPOINT.value
  for split in _SPLIT.value:
    result = evaluate_checkpoint(config, _WORKDIR.value, split, checkpoint)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
