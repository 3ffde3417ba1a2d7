r"""Generates the LRA ListOps data set (basic_train.tsv, basic_val.tsv, basic_test.tsv).

The LRA release (96000/2000/2000 examples, 500 < length < 2000), about a minute on one CPU core:

  python scripts/make_listops.py --output_dir data/listops

A small version for quick runs:

  python scripts/make_listops.py --output_dir data/listops_small \
      --num_train=5000 --num_val=500 --num_test=500 --min_length=20 --max_length=128

The same flags and seed always give the same files.
"""

from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging

from lra import cli
from lra.tasks import listops_generator

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write basic_{train,val,test}.tsv into.", required=True)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 96_000, "Number of training examples.", lower_bound=1)
_NUM_VAL = flags.DEFINE_integer("num_val", 2_000, "Number of validation examples.", lower_bound=1)
_NUM_TEST = flags.DEFINE_integer("num_test", 2_000, "Number of test examples.", lower_bound=1)
_MIN_LENGTH = flags.DEFINE_integer("min_length", 500, "Keep trees with min_length < length (exclusive).",
                                  lower_bound=0)
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2000, "Keep trees with length < max_length (exclusive).",
                                  lower_bound=1)
_MAX_DEPTH = flags.DEFINE_integer("max_depth", 10, "Maximum tree depth (the root is depth 1).", lower_bound=1)
_MAX_ARGS = flags.DEFINE_integer("max_args", 10, "Maximum number of arguments per operator (at least 2).",
                                lower_bound=2)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the output is a function of the flags.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  paths = listops_generator.generate_listops(
      _OUTPUT_DIR.value,
      num_train=_NUM_TRAIN.value,
      num_val=_NUM_VAL.value,
      num_test=_NUM_TEST.value,
      min_length=_MIN_LENGTH.value,
      max_length=_MAX_LENGTH.value,
      max_depth=_MAX_DEPTH.value,
      max_args=_MAX_ARGS.value,
      seed=_SEED.value,
      progress=True,
  )
  for split, path in paths.items():
    logging.info("Wrote %s split to %s", split, path)
    print(f"{split}: {path}")


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit status 2
