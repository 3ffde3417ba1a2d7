"""Config checks before work starts, and a workdir of another config refused before training."""

import importlib
import json
import pathlib

import flax.linen as nn
import ml_collections
import pytest

import attention
from attention import ranges
from lra.training import train_and_evaluate
from lra.training import config_checks
from tests.conftest import tiny_listops_config, write_untrained_workdir

ROOT = pathlib.Path(__file__).resolve().parents[3]
CONFIG_MODULES = sorted(f"configs.{p.relative_to(ROOT / 'configs').with_suffix('').as_posix().replace('/', '.')}"
                        for p in (ROOT / "configs").rglob("*.py")
                        if p.name not in ("__init__.py", "common.py", "command_line.py") and not p.name.startswith("_"))


@pytest.mark.parametrize("module", CONFIG_MODULES)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_shipped_config_is_valid(module, arg):
  config = importlib.import_module(module).get_config(arg)
  assert config_checks.config_problems(config) == []


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
    ("model.dtype", "fp8", "config.model.dtype='fp8' is out of range: expected one of 'float32', 'bfloat16', "
                           "'float16', 'auto'"),
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
    config_checks.validate_config(config)
  assert message in str(info.value)
  assert "\n" not in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
  config = tiny_listops_config(tmp_path, num_steps=-5, learning_rate=-1.0)
  config.model.dropout_rate = 1.5
  problems = config_checks.config_problems(config)
  assert {p.split("=")[0] for p in problems} == {"config.train.num_steps", "config.train.learning_rate",
                                                  "config.model.dropout_rate"}


def test_attention_options_are_checked_through_the_registry(tmp_path):
  config = tiny_listops_config(tmp_path)
  config.model.attention = ml_collections.ConfigDict({"name": "performer", "num_features": 0, "kernel": "softmax"})
  assert config_checks.config_problems(config) == [
      "config.model.attention.num_features=0 is out of range for 'performer': expected an integer >= 1"]
  config.model.attention = ml_collections.ConfigDict({"name": "performer", "num_featurez": 8})
  [problem] = config_checks.config_problems(config)
  assert "config.model.attention.num_featurez: unknown option for attention 'performer'" in problem
  assert "num_features" in problem
  config.model.attention = ml_collections.ConfigDict({"name": "linear", "chunk_size": "big"})
  assert config_checks.config_problems(config) == [
      "config.model.attention.chunk_size='big' is out of range for 'linear': expected an integer >= 1"]
  config.model.attention = ml_collections.ConfigDict({"name": "softmax", "num_heads": 4})
  [problem] = config_checks.config_problems(config)
  assert "set by the encoder from config.model" in problem


def test_unknown_keys_in_task_sections_pass(tmp_path):
  config = tiny_listops_config(tmp_path)
  config.data.some_future_option = {"nested": -1}
  config.train.another = "x"
  assert config_checks.config_problems(config) == []


def test_validation_runs_before_data_is_read(tmp_path):
  config = tiny_listops_config(tmp_path / "never_created", num_steps=-5)
  with pytest.raises(ValueError, match="config.train.num_steps=-5"):
    train_and_evaluate(config, tmp_path / "workdir")
  assert not (tmp_path / "never_created").exists()
  assert not (tmp_path / "workdir").exists()


def test_a_workdir_of_another_config_is_refused_before_training(data_cache, tmp_path):
  # The run's folder as training leaves it, config.json (the trainer's record) and a checkpoint written by the
  # training library, here of the initial state: the refusals read only these (training first added a traced and
  # lowered train and eval step, not a path of the checks).
  config = tiny_listops_config(data_cache, num_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  write_untrained_workdir(tmp_path, config, 2)
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


@pytest.fixture
def outside_variant():
  """A variant registered the way a user's own module would (attention/ is not edited): its option ranges are declared
  beside its fields and nowhere else. Unregistered afterwards so other tests see the package's variants only."""

  @attention.register("outside_scaled")
  class OutsideScaled(attention.AttentionLayer):  # pylint: disable=unused-variable
    width: int = 4
    scale: float = 1.0
    option_ranges = {"width": ranges.Integer(1, 16), "scale": ranges.Real(0.0, lo_open=True)}

    @nn.compact
    def __call__(self, x, mask=None, deterministic=True):
      self.check_inputs(x, mask)
      return self.project_out(self.project(x, "value") * self.scale, x.shape[-1])

  yield "outside_scaled"
  attention.registry._REGISTRY.pop("outside_scaled")  # pylint: disable=protected-access


@pytest.mark.parametrize("variant,option,value,expected", [
    ("transnormer", "block_size", 0, "an integer >= 1"),
    ("transnormer", "mode", "full", "one of 'norm', 'diag'"),
    ("outside", "width", 99, "an integer in [1, 16]"),
    ("outside", "scale", -1.0, "a number > 0.0"),
])
def test_an_out_of_range_option_is_refused_before_data_is_read(tmp_path, outside_variant, variant, option, value,
                                                               expected):
  name = outside_variant if variant == "outside" else variant
  config = tiny_listops_config(tmp_path / "never_created")
  config.model.attention = ml_collections.ConfigDict({"name": name, option: value})
  with pytest.raises(ValueError, match="invalid config") as info:
    train_and_evaluate(config, tmp_path / "workdir")
  assert f"config.model.attention.{option}={value!r} is out of range for {name!r}: expected {expected}" in str(
      info.value)
  assert not (tmp_path / "never_created").exists() and not (tmp_path / "workdir").exists()
  # `build` reads the same declaration: the message names the variant, the option, the value and the range.
  with pytest.raises(ValueError, match=f"attention {name!r}") as info:
    attention.build(name, **{option: value})
  assert option in str(info.value) and repr(value) in str(info.value)


def test_layer_options_are_checked_per_layer(tmp_path):
  config = tiny_listops_config(tmp_path)
  config.model.num_layers = 2
  config.model.attention = ml_collections.ConfigDict({"name": "transnormer"})
  config.model.layer_options = [{"mode": "diag"}, {"mode": "norm", "block_size": -1}]
  assert config_checks.config_problems(config) == [
      "config.model.layer_options[1].block_size=-1 is out of range for 'transnormer': expected an integer >= 1"]
  config.model.layer_options = [{"mode": "diag"}]
  [problem] = config_checks.config_problems(config)
  assert "layer_options has 1 entries; expected one per layer (2)" in problem


def test_config_json_records_every_layer_and_a_resume_compares_layers(tmp_path):
  config = tiny_listops_config(tmp_path)
  config.model.num_layers = 2
  config.model.attention = ml_collections.ConfigDict({"name": "transnormer"})
  record = config_checks.config_record(config)
  assert record["model"]["attention"] == {"name": "transnormer"}  # what the user set
  assert [(layer["name"], layer["mode"]) for layer in record["model"]["resolved_attention"]] == [
      ("transnormer", "diag"), ("transnormer", "norm")]  # what runs
  saved = json.loads(json.dumps(record))
  # An implementation change may resume (same parameters, same math); another layer kind may not.
  config.model.attention.implementation = "xla"
  assert config_checks.config_differences(saved, config) == []
  config.model.attention = ml_collections.ConfigDict({"name": "transnormer", "mode": "norm"})
  assert config_checks.config_differences(saved, config) == [
      "model.resolved_attention.0.mode: 'diag' in the workdir, 'norm' now"]


def test_old_module_paths_are_gone():
  """"validation" names only the data split: the config and record checks' former module paths no longer import."""
  for old in ("lra.tasks.validation", "lra.training.validation"):
    with pytest.raises(ModuleNotFoundError):
      importlib.import_module(old)
