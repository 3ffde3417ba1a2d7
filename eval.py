r"""Evaluates a checkpoint: `python eval.py --workdir runs/x --split test [--config ...] [--checkpoint latest]`.

Without --config the run's own `<workdir>/config.json` is used. Writes `<workdir>/eval_<split>.json` for each split
(`--split validation,test` evaluates both). Config, flag and data errors print one line `error: ...` and exit with
status 2.
"""

import json
import logging as std_logging
from pathlib import Path

import ml_collections
from absl import flags, logging

from configs import common
from lra import cli
from lra.training import evaluate_checkpoint

_CONFIG = common.DEFINE_config_file("config", None, "Config file (default: <workdir>/config.json).",
                                   lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_SPLIT = flags.DEFINE_list("split", ["test"], "Split(s) to evaluate, comma separated (validation,test).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every checkpoint step through absl at INFO; keep the run's own lines readable.
  for noisy in ("absl", "jax"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  config = _CONFIG.value
  if config is None:
    path = Path(_WORKDIR.value) / "config.json"
    if not path.exists():
      raise FileNotFoundError(f"{path} not found: pass --config or point --workdir at a training run")
    try:
      saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise cli.UserError(f"{path} is not valid JSON ({e}); pass --config") from None
    config = ml_collections.ConfigDict(saved)
  checkpoint = int(_CHECKPOINT.value) if _CHECKPOINT.value.isdigit() else _CHECKPOINT.value
  if checkpoint not in ("best", "latest") and not isinstance(checkpoint, int):
    raise cli.UserError(f"--checkpoint={checkpoint!r}: expected 'best', 'latest' or a step number")
  for split in _SPLIT.value:
    result = evaluate_checkpoint(config, _WORKDIR.value, split, checkpoint)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
