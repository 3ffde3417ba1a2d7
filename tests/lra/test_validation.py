"""Config validation before work starts, and a workdir of another config refused before training."""

import importlib
import json
import pathlib

import ml_collections
import pytest

from lra.training import train_and_evaluate
from lra.training import validation
from tests.conftest import tiny_listops_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_MODULES = sorted(f"configs.{p.relative_to(ROOT / 'configs').with_suffix('').as_posix().replace('/', '.')}"
                        for p in (ROOT / "configs").rglob("*.py")
                        if p.name not in ("__init__.py", "common.py") and not p.name.startswith("_"))


@pytest.mark.parametrize("module", CONFIG_MODULES)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_shipped_config_is_valid(module, arg):
  config = importlib.import_module(module).get_config(arg)
  assert validation.config_problems(config) == []


BAD = [
    ("train.num_steps", -5, "config.train.num_steps=-5 is out of range: expected an integer >= 1"),
    ("train.batch_size", 0, "config.train.batch_size=0"),
    ("train.eval_batch_size", -1, "config.train.eval_batch_size=-1"),
    ("train.learning_rate", -0.1, "config.train.learning_rate=-0.1 is out of range: expected a number > 0.0"),
    ("train.learning_rate", float("nan"), "config.train.learning_rate=nan"),
    ("model.dropout_rate", 1.5, "config.model.dropout_rate=1.5 is out of range: expected a number in [0.0, 1.0)"),
    ("model.attention_dropout_rate", -0.1, "config.model.attention_dropout_rate=-0.1"),
    ("train.warmup_steps", -1, "config.train.warmup_steps=-1"),
    ("train.warmup_steps", 21, "expected an integer in [0, train.num_steps=20]"),
    ("train.b1", 1.0, "config.train.b1=1.0"),
    ("train.b2", -0.5, "config.train.b2=-0.5"),
    ("train.eps", 0.0, "config.train.eps=0.0 is out of range: expected a number > 0.0"),
    ("train.weight_decay", -1.0, "config.train.weight_decay=-1.0"),
    ("train.grad_clip_norm", 0.0, "config.train.grad_clip_norm=0.0"),
    ("train.log_every_steps", 0, "config.train.log_every_steps=0"),
    ("train.eval_every_steps", 0, "config.train.eval_every_steps=0"),
    ("train.checkpoint_every_steps", -3, "config.train.checkpoint_every_steps=-3"),
    ("train.keep_checkpoints", 0, "config.train.keep_checkpoints=0"),
    ("train.num_eval_batches", 0, "config.train.num_eval_batches=0"),
    ("train.optimizer", "sgd", "config.train.optimizer='sgd' is out of range: expected one of 'adamw'"),
    ("train.schedule", "linear", "config.train.schedule='linear' is out of range: expected one of 'rsqrt'"),
    ("model.pooling", "max", "config.model.pooling='max' is out of range: expected one of 'cls', 'mean'"),
    ("model.pos_encoding", "spiral", "config.model.pos_encoding='spiral'"),
    ("model.dtype", "float16", "config.model.dtype='float16' is out of range: expected one of 'float32', 'bfloat16'"),
    ("model.num_layers", 0, "config.model.num_layers=0"),
    ("model.emb_dim", -8, "config.model.emb_dim=-8"),
    ("data.max_length", 0, "config.data.max_length=0"),
    ("mesh.data", 0, "config.mesh.data=0 is out of range: expected -1 (all devices) or an integer >= 1"),
    ("task", "nosuch", "config.task='nosuch'"),
    ("model.attention.name", "nosuch", "config.model.attention.name='nosuch'"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_each_bad_value_is_named_with_its_range(tmp_path, key, value, message):
  config = tiny_listops_config(tmp_path / "cache", schedule="cosine")
  with config.unlocked():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    if leaf in node:
      with config.ignore_type():
        node[leaf] = value
    else:
      node[leaf] = value
  with pytest.raises(ValueError, match="invalid config") as info:
    validation.validate_config(config)
  assert message in str(info.value)
  assert "\n" not in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
  config = tiny_listops_config(tmp_path, num_steps=-5, learning_rate=-1.0)
  config.model.dropout_rate = 1.5
  problems = validation.config_problems(config)
  assert {p.split("=")[0] for p in problems} == {"config.train.num_steps", "config.train.learning_rate",
                                                  "config.model.dropout_rate"}


def test_attention_options_are_checked_through_the_registry(tmp_path):
  config = tiny_listops_config(tmp_path)
  config.model.attention = ml_collections.ConfigDict({"name": "performer", "num_features": 0, "kernel": "softmax"})
  assert validation.config_problems(config) == [
      "config.model.attention.num_features=0 is out of range for 'performer': expected an integer >= 1"]
  config.model.attention = ml_collections.ConfigDict({"name": "performer", "num_featurez": 8})
  [problem] = validation.config_problems(config)
  assert "config.model.attention.num_featurez: unknown option for attention 'performer'" in problem
  assert "num_features" in problem
  config.model.attention = ml_collections.ConfigDict({"name": "linear", "chunk_size": "big"})
  assert validation.config_problems(config) == [
      "config.model.attention.chunk_size='big' is out of range for 'linear': expected an integer >= 1"]
  config.model.attention = ml_collections.ConfigDict({"name": "softmax", "num_heads": 4})
  [problem] = validation.config_problems(config)
  assert "set by the encoder from config.model" in problem


def test_unknown_keys_in_task_sections_pass(tmp_path):
  config = tiny_listops_config(tmp_path)
  config.data.some_future_option = {"nested": -1}
  config.train.another = "x"
  assert validation.config_problems(config) == []


def test_validation_runs_before_data_is_read(tmp_path):
  config = tiny_listops_config(tmp_path / "never_created", num_steps=-5)
  with pytest.raises(ValueError, match="config.train.num_steps=-5"):
    train_and_evaluate(config, tmp_path / "workdir")
  assert not (tmp_path / "never_created").exists()
  assert not (tmp_path / "workdir").exists()


def test_a_workdir_of_another_config_is_refused_before_training(data_cache, tmp_path):
  config = tiny_listops_config(data_cache, num_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  train_and_evaluate(config, tmp_path)
  saved = (tmp_path / "config.json").read_text()

  other = tiny_listops_config(data_cache, num_steps=4, eval_every_steps=2, checkpoint_every_steps=2)
  other.model.update(emb_dim=48, mlp_dim=96)
  with pytest.raises(ValueError, match="holds a run of another config") as info:
    train_and_evaluate(other, tmp_path)
  message = str(info.value)
  assert "model.emb_dim: 32 in the workdir, 48 now" in message and "model.mlp_dim" in message
  assert "new --workdir" in message and "train.num_steps" not in message.split("(")[1].split(")")[0]
  assert (tmp_path / "config.json").read_text() == saved  # the refused run changed nothing

  # Without a usable config.json, the checkpoint's arrays are compared: the differing ones are named.
  (tmp_path / "config.json").write_text(json.dumps(other.to_dict(), default=str))
  with pytest.raises(ValueError, match="written by a different model or task") as info:
    train_and_evaluate(other, tmp_path)
  assert "params/encoder/" in str(info.value) and "(32,)" in str(info.value) and "(48,)" in str(info.value)
  assert "new --workdir" in str(info.value)
