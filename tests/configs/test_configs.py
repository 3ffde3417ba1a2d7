"""Every config file loads (default, runlocal, each attention variant); argument parsing is strict."""

import importlib.util
import pathlib

import ml_collections
import pytest

import attention
from configs import common

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").rglob("*.py")
                      if p.name != "__init__.py" and "def get_config" in p.read_text())


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_config_files():
  assert any(p.name == "listops.py" for p in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_file_loads(path):
  module = _load(path)
  rel = str(path.relative_to(ROOT))
  assert module.__doc__ and f"python train.py --config {rel}" in module.__doc__, "docstring shows its command lines"
  for arg in (None, "", "runlocal"):
    config = module.get_config(arg)
    assert isinstance(config, ml_collections.ConfigDict)
    for section in ("model", "data", "train", "mesh"):
      assert section in config, section
    assert config.model.attention.name == "softmax"
    # Encoder options every config exposes, so dotted overrides work on every task.
    assert {"remat", "reversible", "post_ln", "pooling", "pos_encoding"} <= set(config.model), sorted(config.model)
  for name in attention.names():
    config = module.get_config(f"runlocal,attention={name}")
    assert config.model.attention.name == name
  with pytest.raises(ValueError, match="unknown config argument 'bogus'.*valid keys"):
    module.get_config("bogus=1")
  with pytest.raises(ValueError, match="unknown attention variant 'nope'.*valid choices"):
    module.get_config("attention=nope")


def test_listops_defaults_are_the_lra_settings():
  config = _load(ROOT / "configs/lra/listops.py").get_config()
  m, t = config.model, config.train
  assert (m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.pooling) == (4, 512, 1024, 8, "cls")
  assert (t.batch_size, t.learning_rate, t.num_steps, t.warmup_steps, t.weight_decay, t.b2) == (
      32, 0.05, 5000, 1000, 0.1, 0.98)
  assert config.data.max_length == 2000


def test_runlocal_is_small():
  config = _load(ROOT / "configs/lra/listops.py").get_config("runlocal")
  assert config.train.num_steps <= 1000 and config.data.max_length <= 256 and config.model.emb_dim <= 128


def test_parse_arg_types_and_errors():
  defaults = {"runlocal": False, "attention": "softmax", "steps": 10, "lr": 0.1}
  parsed = common.parse_arg("runlocal,steps=20,lr=1", defaults)
  assert parsed.runlocal is True and parsed.steps == 20 and parsed.lr == 1.0
  assert common.parse_arg("runlocal=false", defaults).runlocal is False
  with pytest.raises(ValueError, match="steps: could not parse .abc."):
    common.parse_arg("steps=abc", defaults)
  with pytest.raises(ValueError, match="steps: expected a int, got '1.5'"):
    common.parse_arg("steps=1.5", defaults)
  with pytest.raises(ValueError, match="runlocal: expected a boolean"):
    common.parse_arg("runlocal=maybe", defaults)


def test_attention_options_are_overridable():
  config = common.attention_config("softmax")
  config.implementation = "reference"
  assert config.to_dict() == {"name": "softmax", "implementation": "reference"}
  with pytest.raises(ValueError, match="unknown option"):
    common.attention_config("softmax", window=3)
