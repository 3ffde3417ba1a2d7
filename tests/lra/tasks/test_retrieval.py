"""LRA Retrieval: the AAN TSV reader, the synthetic stand-in, the two-tower model, errors, config, a runlocal step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.lra import retrieval as retrieval_config
from lra import tasks
from lra.models.encoder import Encoder
from lra.models.heads import DualEncoderMatcher, MatchingHead
from lra.tasks import byte_tokens, retrieval, synthetic_aan
from tests.lra.runlocal_support import RUNLOCAL_ATTENTION_OF, run_steps, runlocal_config

ROWS = {
    "train": [("1.0", "P01-1001", "P02-2002", "Parsing with trees", "Tree parsing, again"),
              ("0", "P03-3003", "P04-4004", "Speech \u00e9tude", "Unrelated text")],
    "eval": [("0.0", "A", "B", "first", "second")],
    "test": [("1", "C", "D", "x" * 50, "y")],
}


def _write_tsvs(folder):
  folder.mkdir(parents=True, exist_ok=True)
  for split, rows in ROWS.items():
    text = "".join("\t".join(row) + "\n" for row in rows)
    (folder / f"new_aan_pairs.{split}.tsv").write_text(text, encoding="utf-8")
  return folder


def _task(cache_dir, max_length=32, **data):
  config = retrieval_config.get_config("runlocal")
  config.data.update(cache_dir=str(cache_dir), max_length=max_length, **data)
  return tasks.build(config)


def test_reads_the_lra_tsvs(tmp_path):
  task = _task(tmp_path / "cache", data_dir=str(_write_tsvs(tmp_path / "aan")))
  train = task.dataset("train").arrays
  np.testing.assert_array_equal(train["targets"], [1, 0])
  assert byte_tokens.decode(train["inputs1"][1]) == "Speech \u00e9tude".encode()
  assert byte_tokens.decode(train["inputs2"][0]) == b"Tree parsing, again"
  np.testing.assert_array_equal(train["mask1"], train["inputs1"] != 0)
  np.testing.assert_array_equal(train["mask2"], train["inputs2"] != 0)
  assert task.dataset("validation").arrays["targets"].tolist() == [0]  # the .eval.tsv file
  test = task.dataset("test").arrays
  assert test["inputs1"].shape == (1, 32) and test["mask1"].all()  # truncated to max_length


@pytest.mark.parametrize("line, match", [("1\tA\tB\tonly four", "expected 5 tab-separated columns"),
                                         ("yes\tA\tB\tx\ty", "label b'yes' is not a number"),
                                         ("2\tA\tB\tx\ty", "label 2.0 must be 0 or 1")])
def test_bad_rows_name_the_line(tmp_path, line, match):
  path = tmp_path / "bad.tsv"
  path.write_text("0\tA\tB\tx\ty\n" + line + "\n")
  with pytest.raises(ValueError, match=f"bad.tsv:2: {match}"):
    retrieval.read_pairs(path, 8)


def test_missing_data_is_an_error_naming_the_path_and_the_source(tmp_path):
  config = retrieval_config.get_config()  # the full config: no synthetic fallback
  config.data.cache_dir = str(tmp_path / "cache")
  with pytest.raises(FileNotFoundError, match="data_dir is not set.*lra_release.*tsv_data"):
    tasks.build(config).dataset("train")
  config.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere' / 'new_aan_pairs.train.tsv'}.*lra_release"):
    tasks.build(config).dataset("train")


def test_synthetic_data_has_the_aan_format_and_is_labelled_by_topic(tmp_path):
  paths = synthetic_aan.generate_synthetic_aan(tmp_path, num_train=40, num_eval=6, num_test=6, min_length=30,
                                               max_length=60, seed=3)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(synthetic_aan.SPLIT_FILES.values())
  rows = [line.split("\t") for line in paths["train"].read_text().splitlines()]
  assert len(rows) == 40 and all(len(r) == 5 for r in rows)
  assert sum(r[0] == "1" for r in rows) == 20  # balanced
  assert all(r[1].startswith("synthetic-train-") and 30 <= len(r[3]) <= 60 for r in rows)
  again = synthetic_aan.generate_synthetic_aan(tmp_path / "again", num_train=40, num_eval=6, num_test=6,
                                               min_length=30, max_length=60, seed=3)
  assert again["train"].read_bytes() == paths["train"].read_bytes()
  arrays = retrieval.read_pairs(paths["test"], 64)
  assert arrays["inputs1"].shape == (6, 64)


def test_synthetic_runlocal_data_comes_from_the_cache_dir(tmp_path):
  task = _task(tmp_path / "cache", generate=dict(num_train=8, num_eval=4, num_test=4, min_length=20, max_length=40))
  assert task.data_dir().parent.name == "synthetic_aan"
  assert len(task.dataset("train")) == 8 and len(task.dataset("test")) == 4


def test_model_is_one_shared_encoder_and_the_matching_head():
  encoder = Encoder(vocab_size=byte_tokens.VOCAB_SIZE, max_length=12, emb_dim=16, num_layers=1, num_heads=2,
                    qkv_dim=16, mlp_dim=32, dropout_rate=0.0, attention_dropout_rate=0.0, pos_encoding="sinusoidal")
  model = DualEncoderMatcher(encoder=encoder, num_classes=2, head_mlp_dim=8)
  tokens = jax.random.randint(jax.random.key(0), (2, 3, 12), 2, 258)
  mask = jnp.arange(12)[None, :] < jnp.array([[12], [5], [9]])
  batch = {"inputs1": tokens[0], "inputs2": tokens[1], "mask1": mask, "mask2": mask[::-1]}
  variables = jax.jit(model.init)(jax.random.key(1), batch)
  params = variables["params"]
  assert set(params) == {"encoder", "head"}  # one encoder for both documents
  assert params["head"]["hidden"]["kernel"].shape == (4 * 16, 8)  # [u, v, u*v, u-v]
  assert params["head"]["hidden2"]["kernel"].shape == (8, 4)
  encode = jax.jit(lambda p, x, m: encoder.apply({"params": p}, x, m))
  u = encode(params["encoder"], batch["inputs1"], batch["mask1"])
  v = encode(params["encoder"], batch["inputs2"], batch["mask2"])
  expected = MatchingHead(2, 8).apply({"params": params["head"]}, u, v)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(variables, batch), expected, atol=1e-5)
  # Each document's padding is its own: changing padded tokens of document 2 changes nothing.
  other = {**batch, "inputs2": jnp.where(batch["mask2"], batch["inputs2"], 7)}
  np.testing.assert_allclose(apply(variables, other), apply(variables, batch), atol=1e-5)


def test_defaults_are_the_lra_settings():
  config = retrieval_config.get_config()
  m, t = config.model, config.train
  assert (m.num_layers, m.emb_dim, m.num_heads, m.qkv_dim, m.mlp_dim, m.pooling) == (4, 128, 4, 128, 512, "cls")
  assert (t.batch_size, t.num_steps, t.learning_rate, t.warmup_steps, t.weight_decay) == (32, 5000, 0.05, 8000, 0.1)
  assert config.data.max_length == 4000 and not config.data.synthetic and config.data.data_dir is None
  assert len(retrieval_config.get_sweep()) == 6


def test_runlocal_step(tmp_path):
  config = runlocal_config("retrieval", RUNLOCAL_ATTENTION_OF["retrieval"], tmp_path / "cache",
                           generate=dict(num_train=8, num_eval=4, num_test=4, min_length=20, max_length=40))
  run_steps(config, tmp_path / "run")
