"""LRA Image: CIFAR-10 from python pickles and from class folders (extracted or archived), grayscale as LRA, the
90/10 train/validation split, all-True masks, errors, config defaults, a runlocal step."""

import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from configs.lra import image as image_config
from lra import tasks
from lra.tasks import image, pixels
from tests.lra.runlocal_support import RUNLOCAL_ATTENTION_OF, run_steps, runlocal_config

# Tiny files stand in for the release files here: their sizes are meant to differ from the release's.
pytestmark = pytest.mark.filterwarnings("ignore::lra.tasks.record_checks.DataCountWarning")

PER_BATCH = 4  # images per data_batch_<i>: 20 training images, 18 train / 2 validation


def _rgb(seed: int, count: int) -> np.ndarray:
  rgb = np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
  rgb[:, :4, :4] = 0  # black pixels are data
  return rgb


@pytest.fixture(scope="module")
def cifar_pickles(tmp_path_factory):
  """The python release layout; returns (folder, RGB train images in order, train labels, test RGB, test labels)."""
  root = tmp_path_factory.mktemp("cifar_pickles")
  folder = root / "cifar-10-batches-py"
  folder.mkdir()
  train_rgb, train_labels = _rgb(0, 5 * PER_BATCH), np.arange(5 * PER_BATCH) % 10
  for i in range(5):
    part = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
    data = train_rgb[part].transpose(0, 3, 1, 2).reshape(PER_BATCH, 3072)  # R, G, B planes
    batch = {b"data": data, b"labels": train_labels[part].tolist(), b"batch_label": b"training batch"}
    (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch, protocol=2))
  test_rgb, test_labels = _rgb(1, 3), np.array([3, 1, 4])
  test = {b"data": test_rgb.transpose(0, 3, 1, 2).reshape(3, 3072), b"labels": test_labels.tolist()}
  (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
  (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in image.CLASSES]}))
  return root, train_rgb, train_labels, test_rgb, test_labels


@pytest.fixture(scope="module")
def cifar_folders(tmp_path_factory):
  """Class folders as PNG (lossless, so pixels can be checked) in a .tar.gz; returns (archive folder, images)."""
  root = tmp_path_factory.mktemp("cifar_folders")
  tree = root / "CIFAR-10-images"
  images = {}
  rgb = _rgb(2, 40)
  for split, count in (("train", 3), ("test", 1)):
    for c, name in enumerate(image.CLASSES):
      (tree / split / name).mkdir(parents=True)
      for n in range(count):
        array = rgb[(c * 4 + n) % 40]
        Image.fromarray(array).save(tree / split / name / f"{n:04d}.png")
        images[(split, name, n)] = array
  archive_dir = root / "archive"
  archive_dir.mkdir()
  with tarfile.open(archive_dir / "CIFAR-10-images_png.tar.gz", "w:gz") as tar:
    tar.add(tree, arcname="CIFAR-10-images")
  return archive_dir, tree, images


def _task(data_dir, cache_dir):
  config = image_config.get_config("runlocal")
  config.data.update(data_dir=str(data_dir), cache_dir=str(cache_dir))
  return tasks.build(config)


def test_grayscale_is_tensorflows_rgb_to_grayscale():
  rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [10, 20, 30]], np.uint8)
  # floor(255.5 * (0.2989 r + 0.5870 g + 0.1140 b) / 255)
  np.testing.assert_array_equal(pixels.to_grayscale(rgb), [76, 149, 29, 255, 0, 18])


def test_pickles_give_lra_splits_in_order(cifar_pickles, tmp_path):
  root, train_rgb, train_labels, test_rgb, test_labels = cifar_pickles
  task = _task(root, tmp_path)
  train, validation, test = (task.dataset(s).arrays for s in ("train", "validation", "test"))
  gray = pixels.to_grayscale(train_rgb).reshape(len(train_rgb), 1024)
  np.testing.assert_array_equal(train["inputs"], gray[:18])  # first 90% of data_batch_1..5, in order
  np.testing.assert_array_equal(validation["inputs"], gray[18:])
  np.testing.assert_array_equal(train["targets"], train_labels[:18])
  np.testing.assert_array_equal(test["inputs"], pixels.to_grayscale(test_rgb).reshape(3, 1024))
  np.testing.assert_array_equal(test["targets"], test_labels)
  assert train["inputs"].dtype == np.uint8 and train["inputs"].shape[1] == 1024


def test_black_pixels_are_not_padding(cifar_pickles, tmp_path):
  dataset = _task(cifar_pickles[0], tmp_path).dataset("train")
  assert (dataset.arrays["inputs"][:, 0] == 0).all()  # the black corner
  assert dataset.arrays["mask"].shape == (18, 1024) and dataset.arrays["mask"].all()
  assert dataset[0]["mask"].all()


@pytest.mark.parametrize("which", ["archive", "extracted"])
def test_class_folders_interleave_classes_by_number(cifar_folders, tmp_path, which):
  archive_dir, tree, images = cifar_folders
  task = _task(archive_dir if which == "archive" else tree, tmp_path)
  train, validation = task.dataset("train").arrays, task.dataset("validation").arrays
  # Ordered by (image number, class): 0000 of every class, then 0001, ... The last 10% is 3 of the 30 images.
  assert train["targets"].tolist() == list(range(10)) * 2 + list(range(7))
  assert validation["targets"].tolist() == [7, 8, 9]
  first = pixels.to_grayscale(images[("train", "airplane", 0)]).reshape(1024)
  np.testing.assert_array_equal(train["inputs"][0], first)
  assert task.dataset("test").arrays["targets"].tolist() == list(range(10))


def test_unknown_class_folder_is_an_error(tmp_path):
  folder = tmp_path / "data" / "train" / "dragon"
  folder.mkdir(parents=True)
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "0.png")
  with pytest.raises(ValueError, match="unknown CIFAR-10 class folder 'dragon'"):
    _task(tmp_path / "data", tmp_path / "cache").dataset("train")


def test_missing_data_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"no CIFAR-10 data under {tmp_path}.*cifar-10-python.tar.gz"):
    _task(tmp_path, tmp_path / "cache").dataset("train")


def test_defaults_are_the_lra_settings():
  config = image_config.get_config()
  m, t = config.model, config.train
  assert (m.num_layers, m.emb_dim, m.num_heads, m.qkv_dim, m.mlp_dim, m.dropout_rate, m.attention_dropout_rate) == (
      1, 128, 8, 64, 128, 0.3, 0.2)
  assert (m.pooling, m.pos_encoding) == ("cls", "learned")
  assert (t.batch_size, t.num_steps, t.learning_rate, t.schedule, t.warmup_steps, t.weight_decay) == (
      256, 35_000, 5e-4, "cosine", 175, 0.0)
  assert len(image_config.get_sweep()) == 6


def test_runlocal_step(cifar_pickles, tmp_path):
  config = runlocal_config("image", RUNLOCAL_ATTENTION_OF["image"], tmp_path / "cache", data_dir=str(cifar_pickles[0]))
  run_steps(config, tmp_path / "run")
