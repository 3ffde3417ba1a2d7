"""Shared test helpers: a tiny ListOps config that trains in seconds on CPU, and `load_script` for scripts/."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
from types import ModuleType

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache per test session, shared by the xdist workers and every subprocess they start
# (train.py, sweeps, multi-host and preemption runs compile the same small steps again and again): this halves the
# suite's time on 2 cores. Set before jax is imported; the controller process sets it first and the workers inherit
# it. Fresh per session (no stale entries between runs), removed at the end; EA_TEST_COMPILATION_CACHE=0 turns it off,
# and a JAX_COMPILATION_CACHE_DIR of the user's is respected.
_OWN_CACHE = None
if os.environ.get("EA_TEST_COMPILATION_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ea-test-jax-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# XLA:CPU's backend (LLVM) optimization off: the suite checks values, gradients, lowering and compiled memory (buffer
# assignment is done before the backend, so memory figures do not change), never speed, and most of its time is
# compiling small programs once: a quarter less time on 2 cores. EA_TEST_XLA_OPT=1 keeps XLA's default (benchmark
# scripts always do). Every subprocess a test starts inherits it; tests that set XLA_FLAGS add to it (`xla_flags`).
# XLA:CPU's legacy elemental emitters instead of its MLIR fusion emitters, where this jaxlib has the flag: half the
# compile time of a tiny training step (1.6-2.8 s -> 0.7-1.3 s here for softmax, performer, bigbird, reformer), and
# compiled memory within 0.1% (the same for softmax, linear, performer layer gradients at 1K tokens; longformer 0.05%
# less, bigbird 700 bytes more). XLA aborts on a flag it does not know, so the first process of the session
# asks a child process (once; later processes inherit XLA_FLAGS with the flags in it).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
OPTIONAL_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


def _xla_accepts(flag: str) -> bool:
  import subprocess  # noqa: PLC0415
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(), "JAX_PLATFORMS": "cpu"}
  try:
    return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                          timeout=120, check=False).returncode == 0
  except subprocess.TimeoutExpired:
    return False


if os.environ.get("EA_TEST_XLA_OPT", "0") != "1" and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  _accepted = [flag for flag in OPTIONAL_XLA_FLAGS if _xla_accepts(flag)]
  for _flag in sorted(set(OPTIONAL_XLA_FLAGS) - set(_accepted)):  # said once, by the session's first process
    print(f"tests/conftest.py: this jaxlib does not accept {_flag}; compiling without it (slower suite)",
          file=sys.stderr)
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS, *_accepted]).strip()


# Kernel staging (kernels/platform.py): by default every kernel-backed op traces its TPU and GPU kernels too, even in a
# program that only runs on this CPU (most of the tracing time of a small sharded step). The processes the suite starts
# (train.py, eval.py, scripts, sweeps, multi-host and 8-device runs) only run on CPU: they stage only the XLA forms
# ("local"; a `jax.export` inside still stages every platform). The suite's own process keeps the default "all"
# (`_stage_every_platform` below): its tests export functions they also run, and check what dispatch stages; modules
# that only run on CPU opt in (the contract suite).
os.environ.setdefault("EA_KERNEL_STAGING", "local")


def python_path() -> str:
  """PYTHONPATH for a test's subprocess: the repository first, then the caller's own entries (plugin modules named in
  ATTENTION_PLUGINS / TASK_PLUGINS live there; replacing it would leave the subprocess without them)."""
  return os.pathsep.join(filter(None, [str(pathlib.Path(__file__).resolve().parents[1]),
                                       os.environ.get("PYTHONPATH")]))


def xla_flags(*extra: str) -> str:
  """XLA_FLAGS for a test's subprocess: this session's flags plus `extra` (e.g. a fake device count)."""
  return " ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip()


import pytest  # noqa: E402

from absl import app, flags, logging  # noqa: E402,F401  (app and logging define absl's own flags first)

from configs.lra import listops  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
  """Under xdist (`-n`), distribute whole modules (`loadscope`) unless a `--dist` mode was chosen.

  Several modules compute what their tests check once, in a module fixture: a long subprocess (the sequence-parallel
  contract case on 8 devices, ~150-190 s here; the 8-device training runs) or shared training runs. xdist's default
  `load` hands out single tests, so both workers may get tests of such a module and each runs its fixture (seen here:
  the 8-device subprocess twice in one run). `loadgroup` with `xdist_group` marks would keep only those modules
  together, but under pytest 9.2 xdist 3.8 no longer renames the grouped tests, so the groups are ignored. Set here
  rather than in addopts, which would break `-p no:xdist` runs (the contract suite starts one)."""
  if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", None) == "no":
    config.option.dist = "loadscope"


@pytest.fixture(scope="session", autouse=True)
def _stage_every_platform():
  """In-process tests stage every platform's kernels (the library's default), whatever `EA_KERNEL_STAGING` says to
  the subprocesses; a module may opt into `platform.staging("local")` for CPU-only value checks."""
  from kernels import platform  # noqa: PLC0415
  with platform.staging("all"):
    yield


# In-process modules whose tests only run programs on this CPU: they export nothing and do not look at what dispatch
# stages (tests/kernels, the export and lowering tests, and any module not named here keep "all").
CPU_ONLY_MODULES = frozenset({
    "tests.attention.test_compressed", "tests.attention.test_grassmann", "tests.attention.test_hashing_lowrank_learned",
    "tests.attention.test_moba", "tests.attention.test_adaptive_sparse", "tests.attention.test_routing",
    "tests.attention.test_softmax",
    "tests.attention.test_plugins", "tests.attention.test_nnx", "tests.attention.test_flex_readme",
    "tests.attention.test_sparse", "tests.attention.test_flex", "tests.attention.test_linear_family",
    "tests.attention.test_gated_family", "tests.attention.test_paper_options", "tests.attention.test_random_features",
    "tests.attention.test_additive_multiplicative", "tests.lra.models.test_reversible",
    "tests.lra.training.test_trainer", "tests.lra.training.test_pretrain", "tests.lra.training.test_preemption",
    "tests.lra.training.test_sharding", "tests.lra.models.test_encoder", "tests.lra.models.test_embeddings",
    "tests.lra.tasks.test_text", "tests.lra.tasks.test_retrieval", "tests.lra.tasks.test_image",
    "tests.lra.tasks.test_pathfinder", "tests.lra.tasks.test_snli", "tests.lra.tasks.test_mqar",
    "tests.lra.tasks.test_wikitext2", "tests.lra.tasks.test_registry", "tests.lra.test_multihost",
    "tests.scripts.test_generate", "tests.scripts.test_benchmark_decode", "tests.scripts.test_plot_attention",
    "tests.scripts.test_benchmark", "tests.lra.training.test_config_checks", "tests.scripts.test_sweep",
    "tests.scripts.test_lra_table",
    "tests.configs.test_configs"})


@pytest.fixture(autouse=True)
def _cpu_only_staging(request):
  if os.environ.get("EA_TEST_LOCAL_STAGING", "1") == "1" and request.module.__name__ in CPU_ONLY_MODULES:
    from kernels import platform  # noqa: PLC0415
    with platform.staging("local"):
      yield
  else:
    yield


def pytest_runtest_logreport(report):
  """EA_TEST_TIMES=<file>: one line per test phase as it finishes (`seconds phase nodeid`), written by the controller
  while the suite runs, so the suite's time budget can be read off an interrupted or still running session."""
  path = os.environ.get("EA_TEST_TIMES")
  if path and not hasattr(report, "node"):  # the controller (xdist) or a plain session, not a worker's copy
    with open(path, "a", encoding="utf-8") as f:
      f.write(f"{report.duration:.2f} {report.when} {report.nodeid}\n")


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
  """The session's compilation cache goes with it (only in the process that made it: the controller under xdist)."""
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def load_script(name: str, module_name: str | None = None) -> ModuleType:
  """Imports `scripts/<name>.py` for its functions and removes the absl flags it defined.

  Every xdist worker imports every test module, and scripts define flags at import (several define `--workdir`, some
  mark it required): left registered, two scripts clash (DuplicateFlagError) and an in-process `absl.app.run`
  (lra.cli tests) fails on another script's required flag. Functions of a loaded script must therefore take their
  settings as arguments, not read its flags; the scripts' command lines are tested in subprocesses.
  `module_name` also registers the module in `sys.modules` (code that imports it by name, pickled functions) and
  returns the registered one on later calls.
  """
  if module_name and module_name in sys.modules:  # one module per name: pickled functions must resolve to it
    return sys.modules[module_name]
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(module_name or f"{name}_script", ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  if module_name:
    sys.modules[module_name] = module
  sys.path.insert(0, str(ROOT / "scripts"))
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(ROOT / "scripts"))
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)
  return module


def write_untrained_workdir(workdir: pathlib.Path, config, step: int):
  """A run's folder as training leaves it, without training: config.json (the trainer's record of `config`) and a
  checkpoint of the initial state at `step`, written by the training library's `Checkpoints`. For tests of what reads
  a workdir (refusals, eval.py, plots): training first would only add a traced and compiled train step. Returns the
  `Experiment`."""
  import json  # noqa: PLC0415

  from lra.training import Experiment, checkpoints, config_checks  # noqa: PLC0415

  experiment = Experiment(config)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(config_checks.config_record(experiment.config), default=str))
  saved = checkpoints.Checkpoints(workdir)
  try:
    saved.save_latest(step, experiment.init_state(), {"step": step, "best": None})
    saved.wait()
  finally:
    saved.close()
  return experiment


def tiny_listops_config(cache_dir, **train_overrides):
  """runlocal ListOps shrunk further: 1-layer 32-wide model, 48-token sequences, 256 training examples."""
  config = listops.get_config("runlocal")
  config.data.cache_dir = str(cache_dir)
  config.data.max_length = 48
  config.data.generate.update(num_train=256, num_val=64, num_test=64, min_length=8, max_length=48)
  config.model.update(num_layers=1, emb_dim=32, num_heads=2, qkv_dim=32, mlp_dim=64, head_mlp_dim=64)
  config.train.update(num_steps=20, batch_size=16, eval_batch_size=32, learning_rate=3e-3, warmup_steps=2,
                      schedule="rsqrt", log_every_steps=5, eval_every_steps=10, checkpoint_every_steps=10)
  config.train.update(train_overrides)
  return config


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  """One generated-data cache per test worker."""
  return tmp_path_factory.mktemp("data_cache")
