"""LRA Text: the aclImdb reader (folder and archive), byte tokens and pad-only masks, config defaults, a runlocal
step."""

import tarfile

import numpy as np
import pytest

from configs.lra import text as text_config
from lra import tasks
from lra.tasks import byte_tokens
from tests.lra.runlocal_support import RUNLOCAL_ATTENTION_OF, run_steps, runlocal_config

# Tiny files stand in for the release files here: their sizes are meant to differ from the release's.
pytestmark = pytest.mark.filterwarnings("ignore::lra.tasks.record_checks.DataCountWarning")

# (split, label folder, id, rating, bytes): a NUL byte, UTF-8 and a long review exercise the byte encoding.
REVIEWS = [
    ("train", "pos", 0, 9, b"A great film.<br /><br />Loved it."),
    ("train", "pos", 1, 8, "Caf\u00e9 scenes, tr\u00e8s bien".encode()),
    ("train", "pos", 2, 10, b"x" * 300),
    ("train", "neg", 0, 1, b"Dull\x00and long."),
    ("train", "neg", 1, 2, b"Bad."),
    ("train", "neg", 2, 3, b"Not good at all"),
    ("test", "pos", 0, 7, b"Fine."),
    ("test", "pos", 1, 9, b"Wonderful acting"),
    ("test", "neg", 0, 4, b"Meh"),
    ("test", "neg", 1, 1, b"Awful"),
]


def _write_aclimdb(root):
  for split, label, review_id, rating, content in REVIEWS:
    folder = root / "aclImdb" / split / label
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{review_id}_{rating}.txt").write_bytes(content)
  (root / "aclImdb" / "README").write_text("not a review")
  (root / "aclImdb" / "train" / "unsup").mkdir()
  (root / "aclImdb" / "train" / "unsup" / "0_0.txt").write_bytes(b"unlabelled: not read")


@pytest.fixture(scope="module")
def imdb(tmp_path_factory):
  """{"folder": extracted aclImdb tree, "archive": a folder holding it as aclImdb_v1.tar.gz}."""
  folder = tmp_path_factory.mktemp("imdb_folder")
  _write_aclimdb(folder)
  archive_dir = tmp_path_factory.mktemp("imdb_archive")
  with tarfile.open(archive_dir / "aclImdb_v1.tar.gz", "w:gz") as tar:
    tar.add(folder / "aclImdb", arcname="aclImdb")
  return {"folder": folder, "archive": archive_dir}


def _task(data_dir, cache_dir, max_length=64):
  config = text_config.get_config("runlocal")
  config.data.update(data_dir=str(data_dir), cache_dir=str(cache_dir), max_length=max_length)
  return tasks.build(config)


def _reviews(dataset):
  return sorted((byte_tokens.decode(row), int(label)) for row, label in
                zip(dataset.arrays["inputs"], dataset.arrays["targets"]))


@pytest.mark.parametrize("source", ["folder", "archive"])
def test_reads_the_reviews_with_their_labels(imdb, tmp_path, source):
  task = _task(imdb[source], tmp_path, max_length=400)
  for split in ("train", "test"):
    expected = sorted((content, int(label == "pos")) for s, label, _, _, content in REVIEWS if s == split)
    assert _reviews(task.dataset(split)) == expected


def test_folder_and_archive_give_the_same_arrays(imdb, tmp_path):
  a = _task(imdb["folder"], tmp_path / "a").dataset("train").arrays
  b = _task(imdb["archive"], tmp_path / "b").dataset("train").arrays
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_bytes_are_tokens_and_the_mask_comes_from_padding_only(imdb, tmp_path):
  dataset = _task(imdb["folder"], tmp_path, max_length=16).dataset("train")
  inputs, mask = dataset.arrays["inputs"], dataset.arrays["mask"]
  assert inputs.shape == (6, 16) and byte_tokens.VOCAB_SIZE == 258
  row = next(i for i, r in enumerate(inputs) if byte_tokens.decode(r).startswith(b"Dull"))
  expected = np.frombuffer(b"Dull\x00and long.", np.uint8).astype(np.int16) + 2
  np.testing.assert_array_equal(inputs[row, :14], expected)
  assert inputs[row, 4] == 2 and mask[row, 4]  # the NUL byte is data, not padding
  np.testing.assert_array_equal(mask[row], np.arange(16) < 14)
  np.testing.assert_array_equal(mask, inputs != byte_tokens.PAD_ID)
  long_row = next(i for i, r in enumerate(inputs) if byte_tokens.decode(r) == b"x" * 16)  # truncated
  assert mask[long_row].all()


def test_test_split_is_the_validation_split_as_in_lra(imdb, tmp_path):
  task = _task(imdb["folder"], tmp_path)
  assert (task.train_split, task.validation_split, task.eval_splits) == ("train", "test", ("test",))
  with pytest.raises(ValueError, match="unknown text split 'validation'.*'train', 'test'"):
    task.dataset("validation")


def test_missing_data_names_the_path_and_the_download(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*aclImdb_v1.tar.gz"):
    _task(tmp_path, tmp_path / "cache").dataset("train")
  config = text_config.get_config()
  config.data.cache_dir = str(tmp_path / "cache")
  with pytest.raises(FileNotFoundError, match="data_dir is not set.*aclImdb_v1.tar.gz"):
    tasks.build(config).dataset("train")


def test_defaults_are_the_lra_settings():
  config = text_config.get_config()
  m, t = config.model, config.train
  assert (m.num_layers, m.emb_dim, m.num_heads, m.qkv_dim, m.mlp_dim, m.pooling, m.pos_encoding) == (
      4, 256, 4, 256, 1024, "cls", "lra_sinusoidal")
  assert (t.batch_size, t.num_steps, t.learning_rate, t.schedule, t.warmup_steps, t.weight_decay) == (
      32, 20_000, 0.05, "rsqrt", 8000, 0.1)
  assert config.data.max_length == 4000


def test_sweep_is_a_learning_rate_and_warmup_grid():
  sweep = text_config.get_sweep()
  assert len(sweep) == 6 and all(set(p) == {"train.learning_rate", "train.warmup_steps"} for p in sweep)
  assert {p["train.learning_rate"] for p in sweep} == {0.025, 0.05, 0.1}


def test_runlocal_step(imdb, tmp_path):
  config = runlocal_config("text", RUNLOCAL_ATTENTION_OF["text"], tmp_path / "cache", data_dir=str(imdb["archive"]))
  final = run_steps(config, tmp_path / "run")
  assert set(final) == {"test"}
