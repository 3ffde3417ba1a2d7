"""Shared test helpers: a tiny ListOps config that trains in seconds on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from configs.lra import listops  # noqa: E402


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
