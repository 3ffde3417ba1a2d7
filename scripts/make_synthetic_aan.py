r"""Writes a small SYNTHETIC stand-in for the LRA Retrieval (AAN) data in its TSV format (lra/tasks/synthetic_aan.py).

Not the AAN corpus: documents about made-up topics, label 1 when a pair shares its topic. For smoke runs only
(`configs/lra/retrieval.py:runlocal` generates the same data into its cache dir by itself):

  python scripts/make_synthetic_aan.py --output_dir data/synthetic_aan
  python train.py --config configs/lra/retrieval.py:runlocal --workdir runs/retrieval_synthetic \
      --config.data.data_dir=data/synthetic_aan
"""

from collections.abc import Sequence

from absl import app
from absl import flags

from lra import cli
from lra.tasks import synthetic_aan

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write new_aan_pairs.*.tsv into.", required=True)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 4000, "Training pairs.", lower_bound=1)
_NUM_EVAL = flags.DEFINE_integer("num_eval", 500, "Validation pairs (the .eval.tsv file).", lower_bound=1)
_NUM_TEST = flags.DEFINE_integer("num_test", 500, "Test pairs.", lower_bound=1)
_NUM_TOPICS = flags.DEFINE_integer("num_topics", 8, "Made-up topics.", lower_bound=1)
_MIN_LENGTH = flags.DEFINE_integer("min_length", 200, "Shortest document, characters.", lower_bound=1)
_MAX_LENGTH = flags.DEFINE_integer("max_length", 400, "Longest document, characters.", lower_bound=1)
_TOPIC_SHARE = flags.DEFINE_float("topic_share", 0.5, "Share of topic words in a document (the rest are common).",
                                  lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the output is a function of the flags.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  paths = synthetic_aan.generate_synthetic_aan(
      _OUTPUT_DIR.value, num_train=_NUM_TRAIN.value, num_eval=_NUM_EVAL.value, num_test=_NUM_TEST.value,
      num_topics=_NUM_TOPICS.value, min_length=_MIN_LENGTH.value, max_length=_MAX_LENGTH.value,
      topic_share=_TOPIC_SHARE.value, seed=_SEED.value)
  for split, path in paths.items():
    print(f"{split}: {path}")


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit status 2
