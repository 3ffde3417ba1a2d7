r"""Generates Pathfinder / Path-X images in the LRA release layout (lra/tasks/pathfinder_generator.py).

  <output_dir>/pathfinder{N}/curv_<difficulty>/imgs/<batch>/sample_<i>.png
  <output_dir>/pathfinder{N}/curv_<difficulty>/metadata/<batch>.npy

The LRA Pathfinder set (32x32, 200,000 images per difficulty; about 40 ms of CPU per image, all cores by default):

  python scripts/make_pathfinder.py --output_dir data/lra_release --resolution 32

Path-X (128x128, the hardest difficulty only):

  python scripts/make_pathfinder.py --output_dir data/lra_release --resolution 128 --difficulties contour_length_14

A small set for quick runs:

  python scripts/make_pathfinder.py --output_dir data/pathfinder_small --num_images 2000 --difficulties baseline

An interrupted run resumes (finished batches are kept); the same flags always give the same images. Then train with
`--config.data.data_dir=<output_dir>`.
"""

from collections.abc import Sequence

from absl import app
from absl import flags

from lra import cli
from lra.tasks import pathfinder_generator

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write pathfinder{N}/ into.", required=True)
_RESOLUTION = flags.DEFINE_enum("resolution", "32", [str(r) for r in pathfinder_generator.RESOLUTIONS],
                                "Image size in pixels (LRA settings exist for each).")
_DIFFICULTIES = flags.DEFINE_multi_enum("difficulties", list(pathfinder_generator.DIFFICULTIES),
                                        list(pathfinder_generator.DIFFICULTIES),
                                        "Contour lengths to generate (LRA's easy, intermediate, hard).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 200_000, "Images per difficulty.", lower_bound=1)
_IMAGES_PER_BATCH = flags.DEFINE_integer("images_per_batch", 1000, "Images per imgs/<batch>/ folder.", lower_bound=1)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Worker processes (0: one per CPU core).", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the output is a function of the flags.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  folders = pathfinder_generator.generate_pathfinder(
      _OUTPUT_DIR.value, resolution=int(_RESOLUTION.value), difficulties=_DIFFICULTIES.value,
      num_images=_NUM_IMAGES.value, images_per_batch=_IMAGES_PER_BATCH.value,
      num_workers=_NUM_WORKERS.value or None, seed=_SEED.value, progress=True)
  for difficulty, folder in folders.items():
    print(f"{difficulty}: {folder}")


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit status 2
