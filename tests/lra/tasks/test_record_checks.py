"""Data readers validate every record: bad labels, columns, fields and unreadable files are one-line errors naming the
file (and line) and what was expected; release files with other sizes than the release's are a warning naming them."""

import gzip
import json
import pickle
import tarfile
import warnings

import numpy as np
import pytest

from lra.tasks import archive, cache, image, listops, pathfinder, record_checks, snli, text, wikitext2
from lra.tasks.record_checks import DataCountWarning


def _one_line_error(excinfo, *fragments):
  message = str(excinfo.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, (fragment, message)


# ListOps ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, fragments", [
    ("[MAX 2 9 ]\t10", ["basic_train.tsv:3:", "label 10 out of range", "0..9"]),
    ("[MAX 2 9 ]\t-1", ["basic_train.tsv:3:", "label -1 out of range"]),
    ("[MAX 2 9 ]", ["basic_train.tsv:3:", "expected 2 tab-separated columns", "got 1"]),
    ("[MAX 2 9 ]\t4\textra", ["basic_train.tsv:3:", "expected 2 tab-separated columns", "got 3"]),
    ("[MAX 2 9 ]\tnine", ["basic_train.tsv:3:", "label 'nine' is not an integer"]),
    ("[MAX 2 X ]\t9", ["basic_train.tsv:3:", "unknown ListOps token 'X'"]),
    ("\t9", ["basic_train.tsv:3:", "empty Source"]),
])
def test_listops_bad_rows_name_file_line_and_value(tmp_path, row, fragments):
  path = tmp_path / "basic_train.tsv"
  path.write_text(f"Source\tTarget\n( ( [MIN 3 5 ] ) )\t3\n{row}\n[SM 1 2 ]\t3\n")
  with pytest.raises(ValueError) as excinfo:
    listops.read_tsv(path, 16)
  _one_line_error(excinfo, str(path), *fragments)


def test_listops_good_file_reads_and_label_error_reaches_the_task(tmp_path):
  good = "Source\tTarget\n( [MAX 2 9 ] )\t9\n\n[SM 1 2 ]\t3.0\n"
  path = tmp_path / "basic_train.tsv"
  path.write_text(good)
  arrays = listops.read_tsv(path, 8)
  assert arrays["targets"].tolist() == [9, 3] and arrays["targets"].dtype == np.int32
  # Through the task (what a run does): the bad label stops it before training, not as a NaN loss later.
  from configs.lra import listops as listops_config  # pylint: disable=g-import-not-at-top
  from lra import tasks  # pylint: disable=g-import-not-at-top
  config = listops_config.get_config("runlocal")
  config.data.update(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), max_length=8)
  for name in ("basic_val.tsv", "basic_test.tsv"):
    (tmp_path / name).write_text(good)
  path.write_text(good + "[MIN 4 5 ]\t12\n")
  with pytest.raises(ValueError, match=r"basic_train.tsv:5: label 12 out of range"):
    tasks.build(config).dataset("train")


def test_check_labels_is_vectorized_and_names_first_bad_record():
  labels = np.array([0, 1, 1, 7, 0, 9])
  with pytest.raises(ValueError, match=r"f.tsv:40: label 7 out of range; expected one of 0, 1 \(2 bad records"):
    record_checks.check_labels("f.tsv", labels, (0, 1), lines=np.arange(10, 70, 10))
  record_checks.check_labels("f.tsv", labels, range(10))


# SNLI ---------------------------------------------------------------------------------------------------------------

def _snli_line(label="neutral", **fields):
  return json.dumps({"gold_label": label, "sentence1": "A man sleeps.", "sentence2": "A man rests.", **fields}) + "\n"


def test_snli_corrupt_and_truncated_gzip_name_the_file(tmp_path):
  path = tmp_path / "snli_1.0_dev.jsonl.gz"
  path.write_bytes(b"this is not gzip data at all\n")
  with pytest.raises(ValueError) as excinfo:
    snli.read_pairs(path)
  _one_line_error(excinfo, str(path), "not a readable gzip-compressed SNLI jsonl file", "BadGzipFile")
  path.write_bytes(gzip.compress((_snli_line() * 200).encode())[:-40])  # truncated download
  with pytest.raises(ValueError) as excinfo:
    snli.read_pairs(path)
  _one_line_error(excinfo, str(path), "not a readable gzip")


@pytest.mark.parametrize("line, fragments", [
    ('{"gold_label": "neutral", "sentence1": "x"', ["snli_1.0_dev.jsonl:2:", "not a JSON object"]),
    ('["a list"]', ["snli_1.0_dev.jsonl:2:", "expected a JSON object per line"]),
    (_snli_line("entailmnet"), ["snli_1.0_dev.jsonl:2:", "gold_label 'entailmnet'", "entailment, neutral"]),
    (_snli_line(sentence2=None), ["snli_1.0_dev.jsonl:2:", "'sentence2' is None; expected a string"]),
])
def test_snli_bad_lines_name_file_and_line(tmp_path, line, fragments):
  path = tmp_path / "snli_1.0_dev.jsonl"
  path.write_text(_snli_line() + line.rstrip("\n") + "\n" + _snli_line())
  with pytest.raises(ValueError) as excinfo:
    snli.read_pairs(path)
  _one_line_error(excinfo, str(path), *fragments)


def test_snli_skips_no_gold_label_and_warns_on_release_count(tmp_path):
  from configs import snli as snli_config  # pylint: disable=g-import-not-at-top
  from lra import tasks  # pylint: disable=g-import-not-at-top
  (tmp_path / "snli_1.0_dev.jsonl").write_text(_snli_line() * 30 + _snli_line("-"))
  with gzip.open(tmp_path / "snli_1.0_test.jsonl.gz", "wt") as f:
    f.write(_snli_line("contradiction") * 10)
  assert len(snli.read_pairs(tmp_path / "snli_1.0_dev.jsonl")) == 30
  config = snli_config.get_config("runlocal")
  config.data.update(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), max_length=8, train_source="dev")
  with pytest.warns(DataCountWarning) as record:
    tasks.build(config).dataset("train")
  messages = [str(w.message) for w in record]
  assert any(str(tmp_path / "snli_1.0_dev.jsonl") in m and "30 pairs" in m and "9,842" in m for m in messages)
  assert any("snli_1.0_test.jsonl.gz" in m and "9,824" in m for m in messages)


def test_release_counts_agree_without_warning():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert record_checks.check_count("x", "pairs", 9_842, snli.RELEASE_PAIRS["dev"], "SNLI 1.0")
  assert snli.RELEASE_PAIRS["dev"] == 9_842
  assert wikitext2.RELEASE_TOKENS["train"] == 2_088_628
  assert text.RELEASE_REVIEWS == {"train": 25_000, "test": 25_000}
  assert image.RELEASE_IMAGES == {"train": 50_000, "test": 10_000}


# WikiText-2 ---------------------------------------------------------------------------------------------------------

def test_wikitext2_count_warning_and_binary_file(tmp_path):
  from configs import wikitext2 as wt2_config  # pylint: disable=g-import-not-at-top
  from lra import tasks  # pylint: disable=g-import-not-at-top
  for split in ("train", "valid", "test"):
    (tmp_path / f"wiki.{split}.tokens").write_text(" the cat sat . \n\n the dog . \n")
  config = wt2_config.get_config("runlocal")
  config.data.update(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), max_length=4)
  with pytest.warns(DataCountWarning, match=r"wiki.train.tokens: 10 tokens including <eos>, but the WikiText-2 "
                                            r"release has 2,088,628"):
    tasks.build(config).dataset("train")
  (tmp_path / "wiki.train.tokens").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe binary")
  with pytest.raises(ValueError) as excinfo:
    wikitext2.read_tokens(tmp_path / "wiki.train.tokens")
  _one_line_error(excinfo, "wiki.train.tokens", "not UTF-8 text")
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="empty.txt is empty"):
    wikitext2.read_tokens(tmp_path / "empty.txt")


# IMDB (Text) and archives -------------------------------------------------------------------------------------------

def _aclimdb(root, reviews):
  for split, label, name in reviews:
    folder = root / "aclImdb" / split / label
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"review text")
  return root


def test_imdb_rating_must_match_folder_and_counts_warn(tmp_path):
  good = [("train", "pos", "0_9.txt"), ("train", "neg", "0_2.txt"), ("test", "pos", "0_7.txt"),
          ("test", "neg", "0_4.txt")]
  root = _aclimdb(tmp_path / "good", good)
  with pytest.warns(DataCountWarning, match=r"2 train reviews, but the aclImdb v1 release has 25,000"):
    arrays = text.read_aclimdb(archive.find(root, text.REVIEW_PATTERN), 16)
  assert sorted(arrays["train_targets"].tolist()) == [0, 1]
  root = _aclimdb(tmp_path / "bad", good + [("train", "pos", "1_3.txt")])
  with pytest.raises(ValueError) as excinfo:
    text.read_aclimdb(archive.find(root, text.REVIEW_PATTERN), 16)
  _one_line_error(excinfo, str(root / "aclImdb" / "train" / "pos" / "1_3.txt"), "rating 3 in a pos/ folder", "7..10")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_archive_names_the_file(tmp_path, damage):
  root = _aclimdb(tmp_path / "tree", [("train", "pos", f"{i}_9.txt") for i in range(50)])
  path = tmp_path / "data" / "aclImdb_v1.tar.gz"
  path.parent.mkdir()
  with tarfile.open(path, "w:gz") as tar:
    tar.add(root / "aclImdb", arcname="aclImdb")
  content = path.read_bytes()
  path.write_bytes(b"<html>404 not found</html>" if damage == "garbage" else content[:len(content) // 2])
  with pytest.raises(ValueError) as excinfo:
    text.read_aclimdb(archive.find(path.parent, text.REVIEW_PATTERN), 16)
  _one_line_error(excinfo, str(path), "not a readable tar archive", ".tar.gz")


# CIFAR-10 (Image) ---------------------------------------------------------------------------------------------------

def _cifar_pickles(folder, test_labels=(3, 1)):
  folder.mkdir(parents=True)
  data = np.zeros((2, 3072), np.uint8)
  for i in range(1, 6):
    (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": data, b"labels": [0, 9]}, protocol=2))
  (folder / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": list(test_labels)}, protocol=2))
  return folder


def test_cifar_pickles_labels_shapes_and_counts(tmp_path):
  folder = _cifar_pickles(tmp_path / "ok" / "cifar-10-batches-py")
  pattern, reader = image.FORMATS["pickles"]
  with pytest.warns(DataCountWarning, match=r"10 train images, but the CIFAR-10 release has 50,000"):
    raw = reader(archive.find(folder.parent, pattern))
  assert raw["train_targets"].tolist() == [0, 9] * 5
  folder = _cifar_pickles(tmp_path / "bad" / "cifar-10-batches-py", test_labels=(3, 10))
  with pytest.raises(ValueError) as excinfo:
    reader(archive.find(folder.parent, pattern))
  _one_line_error(excinfo, str(folder / "test_batch"), "label of image 10 out of range", "0..9")
  (folder / "test_batch").write_bytes(b"\x80\x02garbage")
  with pytest.raises(ValueError) as excinfo:
    reader(archive.find(folder.parent, pattern))
  _one_line_error(excinfo, str(folder / "test_batch"), "not readable as a CIFAR-10 python batch")
  (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}))
  with pytest.raises(ValueError, match=r"test_batch: expected data \[N, 3072\]"):
    reader(archive.find(folder.parent, pattern))


def test_cifar_corrupt_image_names_the_file(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split in ("train", "test"):
    (tmp_path / split / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / split / "cat" / "0000.png")
  (tmp_path / "train" / "cat" / "0001.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  pattern, reader = image.FORMATS["class_folders"]
  with pytest.raises(ValueError) as excinfo:
    reader(archive.find(tmp_path, pattern))
  _one_line_error(excinfo, str(tmp_path / "train" / "cat" / "0001.jpg"), "not a readable image")


# Pathfinder and the cache -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, fragments", [
    ("imgs/0 sample_1.png 1 2", ["0.npy:3:", "label 2 out of range", "0, 1"]),
    ("imgs/0 sample_1.png 1", ["0.npy:3:", "expected at least 4 columns", "got 3"]),
    ("imgs/0 sample_1.png 1 yes", ["0.npy:3:", "label 'yes' is not an integer"]),
])
def test_pathfinder_metadata_rows(tmp_path, row, fragments):
  path = tmp_path / "0.npy"
  path.write_text(f"imgs/0 sample_0.png 0 1\n\n{row}\n")
  with pytest.raises(ValueError) as excinfo:
    pathfinder.read_metadata(path)
  _one_line_error(excinfo, str(path), *fragments)


def test_pathfinder_corrupt_png_names_the_file(tmp_path):
  path = tmp_path / "sample_0.png"
  path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  with pytest.raises(ValueError) as excinfo:
    pathfinder._load_image(path, 32)  # pylint: disable=protected-access
  _one_line_error(excinfo, str(path), "not a readable image", "32x32")


def test_unreadable_cache_file_is_remade(tmp_path, caplog):
  path = tmp_path / "arrays.npz"
  path.write_bytes(b"PK\x03\x04 truncated zip")
  arrays = cache.cached_arrays(path, lambda: {"x": np.arange(3)})
  assert arrays["x"].tolist() == [0, 1, 2]
  assert str(path) in caplog.text
  assert cache.cached_arrays(path, lambda: {"x": np.zeros(1)})["x"].tolist() == [0, 1, 2]  # now read back
