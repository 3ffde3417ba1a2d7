r"""Evaluates a checkpoint: `python eval.py --workdir runs/x --split test [--config ...] [--checkpoint latest]`.

Without --config the run's own `<workdir>/config.json` is used. Writes `<workdir>/eval_<split>.json` for each split
(`--split validation,test` evaluates both). Config, flag and data errors print one line `error: ...` and exit with
status 2.

Extrapolation: `--max_length=N` (or `--config ... --config.data.max_length=N`) evaluates the checkpoint on sequences
of another length than it was trained at, where the positional encoding allows it (every encoding but "learned",
whose table ends at the training length: a one-line error). Every result records the length it was evaluated at
(`max_length`); a result at another length than the run's own goes to `<workdir>/eval_<split>_length<N>.json` (with
`trained_max_length`) and never to `eval_<split>.json`, which only ever holds the run's own length:

  python eval.py --workdir runs/wt2_alibi --split validation --max_length=128
"""

import json
import logging as std_logging
from pathlib import Path

import ml_collections
from absl import flags, logging

from lra import cli  # first: lra refuses another package named attention/kernels/configs (attention/packages.py)
from configs import common
from lra.models import embeddings
from lra.training import evaluate_checkpoint

_CONFIG = common.DEFINE_config_file("config", None, "Config file (default: <workdir>/config.json).",
                                   lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_SPLIT = flags.DEFINE_list("split", ["test"], "Split(s) to evaluate, comma separated (validation,test).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Evaluate at this config.data.max_length (default: the "
                                   "config's); another length than the training run's needs an encoding that "
                                   "extrapolates.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every checkpoint step through absl at INFO; keep the run's own lines readable.
  for noisy in ("absl", "jax"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  config = _CONFIG.value
  path = Path(_WORKDIR.value) / "config.json"
  saved = None
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise cli.UserError(f"{path} is not valid JSON ({e}); pass --config") from None
  if config is None:
    if saved is None:
      raise FileNotFoundError(f"{path} not found: pass --config or point --workdir at a training run")
    config = ml_collections.ConfigDict(saved)
  if _MAX_LENGTH.value is not None:
    config = config.copy_and_resolve_references()
    config.data.max_length = _MAX_LENGTH.value
  trained_length = (saved or {}).get("data", {}).get("max_length")
  length = config.data.get("max_length")
  other_length = trained_length is not None and length != trained_length
  if other_length:
    check_extrapolation(config, trained_length)
  checkpoint = int(_CHECKPOINT.value) if _CHECKPOINT.value.isdigit() else _CHECKPOINT.value
  if checkpoint not in ("best", "latest") and not isinstance(checkpoint, int):
    raise cli.UserError(f"--checkpoint={checkpoint!r}: expected 'best', 'latest' or a step number")
  for split in _SPLIT.value:
    print(json.dumps(evaluate_checkpoint(config, _WORKDIR.value, split, checkpoint), indent=2))


def check_extrapolation(config: ml_collections.ConfigDict, trained_length: int) -> None:
  """One-line error when the checkpoint's positional encoding cannot be evaluated at `config.data.max_length`."""
  encoding = config.model.get("pos_encoding")
  if encoding in embeddings.BOUNDED_ENCODINGS:
    raise cli.UserError(f"config.data.max_length={config.data.max_length} differs from the training length "
                        f"{trained_length}, but pos_encoding={encoding!r} has no positions beyond max_length; evaluate "
                        f"at {trained_length}, or train with sinusoidal, lra_sinusoidal, rope, alibi or none")


if __name__ == "__main__":
  cli.run(main)
