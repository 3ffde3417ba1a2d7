"""Every config file loads (default, runlocal, each attention variant) with the values it had before configs became
deltas of configs/common.py and with the per-layer attention options it resolved to before options were resolved in
one place (a snapshot); argument parsing is strict; the attention variant swaps by flag in both directions; what the
user sets wins over a variant's per-layer schedule even when it equals the default."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

import attention
from configs import common
from kernels.common import DTYPE_NAMES
from lra.models.encoder import encoder_from_config
from lra.training import config_checks
from tests.conftest import python_path

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").rglob("*.py")
                      if p.name != "__init__.py" and "def get_config" in p.read_text())

# Key values of each config file (file, arg) before the refactoring into configs/common.py; they must not drift.
KEYS = ("model.num_layers", "model.emb_dim", "model.num_heads", "model.qkv_dim", "model.mlp_dim", "model.dropout_rate",
        "model.pooling", "model.pos_encoding", "data.max_length", "train.num_steps", "train.batch_size",
        "train.eval_batch_size", "train.learning_rate", "train.schedule", "train.warmup_steps", "train.weight_decay",
        "train.b2", "train.grad_clip_norm", "train.eval_every_steps")
EXPECTED = {
    ("configs/lra/image.py", None): (1, 128, 8, 64, 128, 0.3, "cls", "learned", None, 35000, 256, 256, 0.0005,
                                     "cosine", 175, 0.0, 0.98, None, 1750),
    ("configs/lra/image.py", "runlocal"): (1, 64, 2, 64, 128, 0.1, "cls", "learned", None, 300, 16, 50, 0.001,
                                           "cosine", 30, 0.0, 0.999, 1.0, 150),
    ("configs/lra/listops.py", None): (4, 512, 8, 512, 1024, 0.1, "cls", "learned", 2000, 5000, 32, 32, 0.05, "rsqrt",
                                       1000, 0.1, 0.98, None, 500),
    ("configs/lra/listops.py", "runlocal"): (2, 64, 4, 64, 128, 0.0, "cls", "learned", 128, 600, 32, 100, 0.001,
                                             "cosine", 60, 0.01, 0.999, 1.0, 200),
    ("configs/lra/pathfinder.py", None): (4, 32, 4, 16, 32, 0.2, "mean", "lra_sinusoidal", None, 62400, 512, 512, 0.001,
                                          "cosine", 312, 0.0, 0.98, None, 3120),
    ("configs/lra/pathfinder.py", "runlocal"): (2, 32, 2, 32, 64, 0.0, "mean", "lra_sinusoidal", None, 300, 16, 50,
                                                0.001, "cosine", 30, 0.0, 0.999, 1.0, 150),
    ("configs/lra/pathx.py", None): (1, 32, 2, 16, 32, 0.1, "mean", "learned", None, 500000, 64, 64, 0.001, "cosine",
                                     2500, 0.0, 0.98, 1.0, 25000),
    ("configs/lra/pathx.py", "runlocal"): (1, 32, 1, 32, 64, 0.0, "mean", "learned", None, 40, 4, 4, 0.001, "cosine",
                                           4, 0.0, 0.999, 1.0, 20),
    ("configs/lra/retrieval.py", None): (4, 128, 4, 128, 512, 0.1, "cls", "lra_sinusoidal", 4000, 5000, 32, 32, 0.05,
                                         "rsqrt", 8000, 0.1, 0.98, None, 500),
    ("configs/lra/retrieval.py", "runlocal"): (2, 64, 4, 64, 128, 0.0, "cls", "lra_sinusoidal", 256, 200, 32, 100,
                                               0.001, "cosine", 20, 0.01, 0.999, 1.0, 100),
    ("configs/lra/text.py", None): (4, 256, 4, 256, 1024, 0.1, "cls", "lra_sinusoidal", 4000, 20000, 32, 64, 0.05,
                                    "rsqrt", 8000, 0.1, 0.98, None, 1000),
    ("configs/lra/text.py", "runlocal"): (2, 64, 4, 64, 128, 0.1, "cls", "lra_sinusoidal", 512, 300, 32, 100, 0.001,
                                          "cosine", 30, 0.01, 0.999, 1.0, 150),
    ("configs/mqar.py", None): (2, 128, 2, 128, 512, 0.0, "none", "learned", 256, 20000, 64, 128, 0.001, "cosine",
                                1000, 0.1, 0.98, 1.0, 1000),
    ("configs/mqar.py", "runlocal"): (2, 64, 2, 64, 128, 0.0, "none", "learned", 64, 1500, 32, 100, 0.003, "cosine",
                                      100, 0.01, 0.98, 1.0, 500),
    ("configs/snli.py", None): (6, 256, 4, 256, 1024, 0.1, "mean", "learned", 64, 20000, 64, 128, 0.0005, "cosine",
                                1000, 0.01, 0.98, 1.0, 1000),
    ("configs/snli.py", "runlocal"): (2, 128, 4, 128, 256, 0.1, "mean", "learned", 48, 600, 32, 200, 0.001, "cosine",
                                      60, 0.01, 0.98, 1.0, 200),
    ("configs/wikitext2.py", None): (6, 256, 4, 256, 1024, 0.1, "none", "learned", 128, 20000, 32, 32, 0.0005,
                                     "cosine", 1000, 0.01, 0.98, 1.0, 1000),
    ("configs/wikitext2.py", "length=256"): (12, 256, 4, 256, 1024, 0.1, "none", "learned", 256, 20000, 32, 32, 0.0005,
                                             "cosine", 1000, 0.01, 0.98, 1.0, 1000),
    ("configs/wikitext2.py", "runlocal"): (2, 128, 4, 128, 256, 0.1, "none", "learned", 64, 400, 16, 16, 0.002,
                                           "cosine", 40, 0.01, 0.98, 1.0, 200),
}


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _get(config, key):
  for part in key.split("."):
    config = config.get(part) if config is not None else None
  return config


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
    # The attention sub-config holds the variant and only the options the file sets.
    assert config.model.attention.to_dict() == {"name": "softmax"}
    assert config.model.dtype in DTYPE_NAMES
    # Encoder options every config exposes, so dotted overrides work on every task.
    assert {"remat", "reversible", "post_ln", "pooling", "pos_encoding"} <= set(config.model), sorted(config.model)
  for name in attention.names():
    config = module.get_config(f"runlocal,attention={name}")
    assert config.model.attention.to_dict() == {"name": name}
    for layer in config_checks.resolved_layers(config):
      assert layer.keys() == common.attention_options(name).keys()
  with pytest.raises(ValueError, match="unknown config argument 'bogus'.*valid keys"):
    module.get_config("bogus=1")
  with pytest.raises(ValueError, match="unknown attention variant 'nope'.*valid choices"):
    module.get_config("attention=nope")


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}:{k[1]}")
def test_config_values_are_unchanged(key):
  path, arg = key
  config = _load(ROOT / path).get_config(arg)
  assert dict(zip(KEYS, (_get(config, k) for k in KEYS))) == dict(zip(KEYS, EXPECTED[key]))
  assert config.seed == 0 and config.mesh.to_dict() == {"data": -1, "sequence": 1, "distributed": "auto"}
  assert config.train.optimizer == "adamw" and config.train.keep_checkpoints == 3
  assert config.train.checkpoint_every_steps == config.train.eval_every_steps


def test_sweeps_are_learning_rate_by_warmup_grids():
  image = _load(ROOT / "configs/lra/image.py").get_sweep()
  assert [(p["train.learning_rate"], p["train.warmup_steps"]) for p in image] == [
      (0.00025, 175), (0.00025, 875), (0.0005, 175), (0.0005, 875), (0.001, 175), (0.001, 875)]
  text = _load(ROOT / "configs/lra/text.py").get_sweep("runlocal")
  assert {p["train.warmup_steps"] for p in text} == {15, 30} and all(type(p["train.warmup_steps"]) is int for p in text)


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


def test_attention_sub_config_and_overrides():
  assert common.attention_config("performer", num_features=64).to_dict() == {"name": "performer", "num_features": 64}
  with pytest.raises(ValueError, match="unknown option.*'window'.*valid options: implementation"):
    common.attention_config("softmax", window=3)
  base = _load(ROOT / "configs/lra/listops.py").get_config("runlocal,attention=performer")
  swapped = common.apply_overrides(base, {"model.attention.name": "linear", "model.attention.feature_map": "relu",
                                          "train.learning_rate": "2e-3"})
  # Only what the overrides set: the registry's defaults are not copied into the config.
  assert swapped.model.attention.to_dict() == {"name": "linear", "feature_map": "relu"}
  assert swapped.train.learning_rate == 0.002
  # An option with a None default parses from its annotation (`str | None`); "none" gives None back.
  assert common.apply_overrides(base, {"model.attention.implementation": "xla"}).model.attention.to_dict() == {
      "name": "performer", "implementation": "xla"}
  assert common.apply_overrides(base, {"model.attention.num_features": "32"}).model.attention.num_features == 32
  assert base.model.attention.to_dict() == {"name": "performer"}  # a copy
  with pytest.raises(ValueError, match="model.attention.num_features: model.attention has no 'num_features'"):
    common.apply_overrides(base, {"model.attention.name": "softmax", "model.attention.num_features": 8})
  with pytest.raises(ValueError, match="train.learning_rate: could not parse 'fast'"):
    common.apply_overrides(base, {"train.learning_rate": "fast"})


def _parse_flags(argv, lock_config=True):
  values = flags.FlagValues()
  holder = common.DEFINE_config_file("config", flag_values=values, lock_config=lock_config, sys_argv=argv)
  values(argv)
  return holder.value


def test_variant_swaps_by_flag_both_ways():
  listops = "--config=configs/lra/listops.py:runlocal"
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    # softmax -> performer, then one of performer's options on the same command line (in either order).
    for order in (1, -1):
      flags_ = ["--config.model.attention.name=performer", "--config.model.attention.num_features=128"][::order]
      config = _parse_flags(["prog", listops, *flags_])
      assert config.model.attention.to_dict() == {"name": "performer", "num_features": 128}  # what the user set
      assert {layer["kernel"] for layer in config_checks.resolved_layers(config)} == {"softmax"}  # the default in force
    # performer -> softmax: performer's options go, softmax's come.
    config = _parse_flags(["prog", listops + ",attention=performer", "--config.model.attention.name=softmax",
                           "--config.model.attention.implementation=xla"])
    assert config.model.attention.to_dict() == {"name": "softmax", "implementation": "xla"}
    # config.json's record of it (what train.py writes; the train.py run below does the other direction end to end):
    # every layer's options as they run, the registry defaults with the user's option over them.
    model = json.loads(json.dumps(config_checks.config_record(config), default=str))["model"]
    assert model["attention"] == {"name": "softmax", "implementation": "xla"}
    assert model["resolved_attention"] == [{**common.attention_options("softmax"), "name": "softmax",
                                            "implementation": "xla"}] * config.model.num_layers
    # Without a swap nothing is filled in: the registry supplies the defaults when the model is built.
    config = _parse_flags(["prog", listops + ",attention=linear"])
    assert config.model.attention.to_dict() == {"name": "linear"}
    # An option set to its default value is still the user's: it wins over TransNormer's per-layer schedule.
    config = _parse_flags(["prog", listops + ",attention=transnormer", "--config.model.attention.mode=norm"])
    assert config.model.attention.to_dict() == {"name": "transnormer", "mode": "norm"}
    assert [layer["mode"] for layer in config_checks.resolved_layers(config)] == ["norm", "norm"]
    config = _parse_flags(["prog", listops + ",attention=transnormer"])
    assert [layer["mode"] for layer in config_checks.resolved_layers(config)] == ["diag", "norm"]
    with pytest.raises(flags.IllegalFlagValueError, match="num_features: unknown option.*'softmax'.*valid options: "
                       "implementation"):
      _parse_flags(["prog", listops, "--config.model.attention.num_features=128"])
    with pytest.raises(flags.IllegalFlagValueError, match="unknown attention variant 'nope'.*valid choices"):
      _parse_flags(["prog", listops, "--config.model.attention.name=nope"])
  finally:
    os.chdir(cwd)


TINY = ["--config.train.num_steps=2", "--config.train.warmup_steps=1", "--config.train.log_every_steps=1",
        "--config.train.eval_every_steps=2", "--config.train.checkpoint_every_steps=2", "--config.train.batch_size=8",
        "--config.train.eval_batch_size=16", "--config.model.num_layers=1", "--config.model.emb_dim=16",
        "--config.model.qkv_dim=16", "--config.model.mlp_dim=32", "--config.model.head_mlp_dim=32",
        "--config.model.num_heads=2", "--config.data.max_length=32", "--config.data.generate.num_train=32",
        "--config.data.generate.num_val=16", "--config.data.generate.num_test=16",
        "--config.data.generate.min_length=8", "--config.data.generate.max_length=32"]


@pytest.mark.parametrize("start,swap,option,value,num_layers", [
    # softmax -> transnormer with an option set to its default value: NormAttention in every layer, not TransNormer's
    # DiagAttention lower half. The other direction (performer -> softmax) and other variants' options are checked in
    # process (test_variant_swaps_by_flag_both_ways, with the config.json record); one subprocess for the command line.
    ("runlocal", "transnormer", "mode", "norm", 2),
])
def test_train_py_swaps_variant_and_records_options(tmp_path, data_cache, start, swap, option, value, num_layers):
  cmd = [sys.executable, "train.py", f"--config=configs/lra/listops.py:{start}", f"--workdir={tmp_path}",
         f"--config.data.cache_dir={data_cache}", *TINY, f"--config.model.num_layers={num_layers}",
         f"--config.model.attention.name={swap}", f"--config.model.attention.{option}={value}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                        env={**os.environ, "PYTHONPATH": python_path(), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  model = json.loads((tmp_path / "config.json").read_text())["model"]
  assert model["attention"] == {"name": swap, option: value}  # what the user set
  # Every layer's options as they ran: the registry defaults with the user's option over them.
  assert model["resolved_attention"] == [{**common.attention_options(swap), "name": swap, option: value}] * num_layers
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1] == 2


SNAPSHOT = json.loads((ROOT / "tests/configs/resolved_attention_snapshot.json").read_text())


@pytest.mark.parametrize("path", sorted({k.partition(":")[0] for k in SNAPSHOT}))
def test_every_config_resolves_to_the_snapshot_taken_before_options_were_resolved_once(path):
  """The per-layer attention options each (config file, arg) built before issue 23 (the snapshot was written by the
  old code: configs filling registry defaults, the encoder guessing which ones the user set), for every file with
  its default arg, `runlocal`, `attention=<name>` and `runlocal,attention=<name>`."""
  module = _load(ROOT / path)
  entries = {k.partition(":")[2]: v for k, v in SNAPSHOT.items() if k.partition(":")[0] == path}
  assert {"", "runlocal"} | {f"attention={n}" for n in ("softmax", "transnormer", "based")} <= set(entries)
  for arg, expected in entries.items():
    config = common.prepare_for_command_line(module.get_config(arg or None), {})  # train.py without attention flags
    layers = encoder_from_config(config.model, vocab_size=8, max_length=16).attention_for_layers()
    assert _as_snapshot(layers, expected) == expected, f"{path}:{arg}"
    # config.json records the same layers.
    recorded = json.loads(json.dumps(config_checks.config_record(config)))["model"]["resolved_attention"]
    assert _as_snapshot(recorded, expected) == expected


def _as_snapshot(layers, expected):
  """`layers` as JSON, restricted to the options the snapshot knows; an option a variant gained since (e.g. softmax's
  `num_kv_heads`) must hold its registry default, so it changes nothing that ran before."""
  out = []
  for layer, known in zip(json.loads(json.dumps([dict(layer) for layer in layers])), expected):
    defaults = attention.options(layer["name"])
    added = {k: v for k, v in layer.items() if k not in known}
    assert added == {k: json.loads(json.dumps(defaults[k])) for k in added}, (layer["name"], added)
    out.append({k: v for k, v in layer.items() if k in known})
  return out + json.loads(json.dumps([dict(layer) for layer in layers]))[len(expected):]
