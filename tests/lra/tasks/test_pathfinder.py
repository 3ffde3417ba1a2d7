"""LRA Pathfinder and Path-X tasks: reading the LRA layout (text or numpy metadata), 80/10/10 splits, black pixels as
data (all-True masks), empty images skipped, generation into the cache, errors, config defaults, runlocal steps."""

import numpy as np
import pytest
from PIL import Image

from configs.lra import pathfinder as pathfinder_config
from configs.lra import pathx as pathx_config
from lra import tasks
from lra.tasks import pathfinder, pathfinder_generator
from tests.lra.runlocal_support import RUNLOCAL_ATTENTION_OF, run_steps, runlocal_config


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """20 generated 32x32 images (5 batches of 4) in the LRA layout under <root>/pathfinder32/curv_baseline."""
  root = tmp_path_factory.mktemp("lra_release")
  pathfinder_generator.generate_pathfinder(root, resolution=32, difficulties=["baseline"], num_images=20,
                                           images_per_batch=4, num_workers=1, seed=0)
  return root


def _task(data_dir, cache_dir, config_module=pathfinder_config, **data):
  config = config_module.get_config("runlocal")
  config.data.update(data_dir=None if data_dir is None else str(data_dir), cache_dir=str(cache_dir), **data)
  return tasks.build(config)


def _expected(folder):
  rows = [line.split() for b in range(5) for line in (folder / "metadata" / f"{b}.npy").read_text().splitlines()]
  images = np.stack([np.asarray(Image.open(folder / r[0] / r[1])) for r in rows])
  return images.reshape(len(rows), -1), np.array([int(r[3]) for r in rows])


def test_reads_the_lra_layout_with_80_10_10_splits(release, tmp_path):
  task = _task(release, tmp_path)
  images, labels = _expected(release / "pathfinder32" / "curv_baseline")
  splits = {s: task.dataset(s).arrays for s in ("train", "validation", "test")}
  assert [len(a["targets"]) for a in splits.values()] == [16, 2, 2]
  np.testing.assert_array_equal(np.concatenate([a["inputs"] for a in splits.values()]), images)
  np.testing.assert_array_equal(np.concatenate([a["targets"] for a in splits.values()]), labels)
  assert splits["train"]["inputs"].dtype == np.uint8 and splits["train"]["inputs"].shape[1] == 1024


def test_black_pixels_are_data_not_padding(release, tmp_path):
  dataset = _task(release, tmp_path).dataset("train")
  assert (dataset.arrays["inputs"] == 0).mean() > 0.5  # mostly black background
  assert dataset.arrays["mask"].all() and dataset[3]["mask"].shape == (1024,)


def test_a_pathfinder_folder_and_numpy_metadata_are_read_too(release, tmp_path):
  import shutil
  folder = tmp_path / "pathfinder32"
  shutil.copytree(release / "pathfinder32", folder)
  difficulty = folder / "curv_baseline"
  for path in (difficulty / "metadata").iterdir():  # as the original generator saved it: np.save of a string array
    rows = [line.split() for line in path.read_text().splitlines()]
    with open(path, "wb") as f:
      np.save(f, np.array(rows))
  (difficulty / "imgs" / "4" / "sample_3.png").write_bytes(b"")  # LRA skipped empty images
  task = _task(folder, tmp_path / "cache")  # data_dir = the pathfinder32/ folder itself
  images, labels = _expected(release / "pathfinder32" / "curv_baseline")
  total = sum(len(task.dataset(s)) for s in ("train", "validation", "test"))
  assert total == 19
  np.testing.assert_array_equal(task.dataset("train").arrays["inputs"], images[:15])


def test_missing_data_names_the_path_and_the_generator(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'pathfinder32' / 'curv_baseline' / 'metadata'}.*"
                                              "make_pathfinder.py"):
    _task(tmp_path, tmp_path / "cache").dataset("train")


def test_without_data_dir_the_images_are_generated_into_the_cache(tmp_path):
  task = _task(None, tmp_path, generate=dict(num_images=10, images_per_batch=5, seed=0, num_workers=1))
  assert len(task.dataset("train")) == 8 and len(task.dataset("test")) == 1
  assert list((tmp_path / "pathfinder_generated").glob("*/pathfinder32/curv_baseline/metadata/1.npy"))


def test_pathx_is_pathfinder_at_128_pixels(tmp_path):
  pathfinder_generator.generate_pathfinder(tmp_path / "data", resolution=128, difficulties=["contour_length_14"],
                                           num_images=10, images_per_batch=10, num_workers=1)
  config = pathx_config.get_config()
  config.data.update(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
  task = tasks.build(config)
  assert isinstance(task, pathfinder.PathX) and task.name == "pathx"
  dataset = task.dataset("train")
  assert dataset.arrays["inputs"].shape == (8, 128 * 128)
  assert task.dummy_batch(2)["inputs"].shape == (2, 16384)


def test_defaults_are_the_lra_settings():
  config = pathfinder_config.get_config()
  m, t = config.model, config.train
  assert (m.num_layers, m.emb_dim, m.num_heads, m.qkv_dim, m.mlp_dim, m.pooling, m.pos_encoding) == (
      4, 32, 4, 16, 32, "mean", "lra_sinusoidal")
  assert (t.batch_size, t.num_steps, t.learning_rate, t.schedule, t.warmup_steps) == (512, 62_400, 1e-3, "cosine", 312)
  assert (config.data.resolution, config.data.difficulty, config.data.generate.num_images) == (
      32, "contour_length_14", 200_000)
  config = pathx_config.get_config()
  m, t = config.model, config.train
  assert (m.num_layers, m.emb_dim, m.num_heads, m.qkv_dim, m.mlp_dim, m.pooling, m.pos_encoding) == (
      1, 32, 2, 16, 32, "mean", "learned")
  assert (t.batch_size, t.num_steps, t.grad_clip_norm, t.warmup_steps) == (64, 500_000, 1.0, 2500)
  assert (config.data.resolution, config.data.difficulty) == (128, "contour_length_14")
  assert len(pathfinder_config.get_sweep()) == len(pathx_config.get_sweep()) == 6


@pytest.mark.parametrize("task_name", ["pathfinder", "pathx"])
def test_runlocal_step(tmp_path, task_name):
  config = runlocal_config(task_name, RUNLOCAL_ATTENTION_OF[task_name], tmp_path / "cache",
                           generate=dict(num_images=20, images_per_batch=10, seed=0, num_workers=1))
  run_steps(config, tmp_path / "run")
