"""MQAR: generator invariants (answers, no leakage, unique keys, determinism), query-only metrics, runlocal."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import mqar as mqar_config
from lra import tasks
from lra.tasks import mqar_generator
from lra.training import train_and_evaluate
from tests.lra.runlocal_support import RUNLOCAL_ATTENTION_OF

SMALL = dict(vocab_size=40, num_kv_pairs=6, num_queries=4, seq_len=32)


@pytest.mark.parametrize("placement,filler", [("power_law", "random"), ("uniform", "random"), ("uniform", "zero")])
def test_each_query_answer_is_its_keys_value_without_leakage(placement, filler):
  data = mqar_generator.generate(200, seed=3, placement=placement, filler=filler, **SMALL)
  inputs, targets, query_mask = data["inputs"], data["targets"], data["query_mask"]
  half, context = SMALL["vocab_size"] // 2, 2 * SMALL["num_kv_pairs"]
  assert inputs.shape == targets.shape == query_mask.shape == (200, SMALL["seq_len"])
  assert (query_mask.sum(axis=1) == SMALL["num_queries"]).all()
  assert (targets[~query_mask] == 0).all()
  for x, t, q in zip(inputs, targets, query_mask):
    keys, values = x[0:context:2], x[1:context:2]
    assert len(set(keys)) == len(keys) and len(set(values)) == len(values)  # unique keys: one answer per query
    assert ((1 <= keys) & (keys < half)).all() and ((half <= values) & (values < SMALL["vocab_size"])).all()
    queried = []
    for p in np.flatnonzero(q):
      assert p >= context and (p - context) % 2 == 0
      (i,) = np.flatnonzero(keys == x[p])  # the queried key occurs exactly once among the pairs
      assert t[p] == values[i]
      # No leakage: up to and including the query, the answer occurs only as its pair's value, and the key only
      # as its pair's key and at the query itself.
      assert np.flatnonzero(x[:p + 1] == t[p]).tolist() == [2 * i + 1]
      assert np.flatnonzero(x[:p + 1] == x[p]).tolist() == [2 * i, p]
      queried.append(x[p])
    assert len(set(queried)) == len(queried)  # distinct keys are queried
    if filler == "zero":
      assert (x[context:][~q[context:]] == 0).all()


def test_generator_is_deterministic_given_seed():
  a = mqar_generator.generate(20, seed=1, **SMALL)
  b = mqar_generator.generate(20, seed=1, **SMALL)
  c = mqar_generator.generate(20, seed=2, **SMALL)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_power_law_favours_early_slots_and_uniform_does_not():
  kw = dict(vocab_size=64, num_kv_pairs=4, num_queries=1, seq_len=208)  # 100 query slots
  slot = lambda d: (np.flatnonzero(d["query_mask"].ravel()) % 208 - 8) // 2  # noqa: E731
  power = slot(mqar_generator.generate(2000, seed=0, placement="power_law", **kw))
  uniform = slot(mqar_generator.generate(2000, seed=0, placement="uniform", **kw))
  assert np.median(power) < 20 < np.median(uniform)


@pytest.mark.parametrize("bad,match", [
    (dict(num_queries=7), "num_queries"), (dict(vocab_size=12), "vocab_size"), (dict(seq_len=18), "seq_len"),
    (dict(placement="end"), "placement"), (dict(filler="pad"), "filler")])
def test_bad_arguments_name_the_value(bad, match):
  with pytest.raises(ValueError, match=match):
    mqar_generator.generate(1, **{**SMALL, **bad})


def _config(cache_dir, **generate):
  config = mqar_config.get_config("runlocal")
  config.data.cache_dir = str(cache_dir)
  config.data.max_length = 32
  config.data.generate.update(vocab_size=40, num_kv_pairs=6, num_queries=4, num_train=64, num_val=16, num_test=16)
  config.data.generate.update(generate)
  config.model.update(emb_dim=16, qkv_dim=16, mlp_dim=32, num_heads=2)
  config.train.update(num_steps=3, batch_size=8, eval_batch_size=8, warmup_steps=1, log_every_steps=1,
                      eval_every_steps=3, checkpoint_every_steps=3)
  return config


def test_metrics_count_query_positions_only(tmp_path):
  task = tasks.build(_config(tmp_path))
  batch = task.dataset("validation")[np.arange(4)]
  assert batch["mask"].all()
  queries = batch["query_mask"]
  vocab = task.vocab_size
  # Logits right at query positions and wrong everywhere else: accuracy 1, and the loss does not see the rest.
  logits = np.full(batch["inputs"].shape + (vocab,), -10.0, np.float32)
  wrong = np.where(queries, batch["targets"], (batch["targets"] + 1) % vocab)
  np.put_along_axis(logits, wrong[..., None], 10.0, axis=-1)
  loss, metrics = task.loss_and_metrics(jnp.asarray(logits), {k: jnp.asarray(v) for k, v in batch.items()})
  assert float(metrics["accuracy"][0]) == float(metrics["accuracy"][1]) == queries.sum()
  assert float(loss) < 1e-6
  # Swapping the logits at non-query positions changes nothing; breaking one query position changes both metrics.
  logits2 = np.where(queries[..., None], logits, np.random.default_rng(0).normal(size=logits.shape))
  loss2, metrics2 = task.loss_and_metrics(jnp.asarray(logits2), batch)
  assert float(loss2) == pytest.approx(float(loss)) and float(metrics2["accuracy"][0]) == queries.sum()
  b, p = np.argwhere(queries)[0]
  logits2[b, p] = 0.0
  loss3, metrics3 = task.loss_and_metrics(jnp.asarray(logits2), batch)
  assert float(metrics3["accuracy"][0]) == queries.sum() - 1 and float(loss3) > float(loss)


def test_data_is_cached_and_splits_differ(tmp_path):
  config = _config(tmp_path)
  task = tasks.build(config)
  train, test = task.dataset("train"), task.dataset("test")
  assert len(train) == 64 and len(test) == 16
  assert list((tmp_path / "mqar").glob("train_*.npz"))
  np.testing.assert_array_equal(tasks.build(config).dataset("train").arrays["inputs"], train.arrays["inputs"])
  assert not np.array_equal(train.arrays["inputs"][:16], test.arrays["inputs"])
  with pytest.raises(ValueError, match="num_queries"):
    tasks.build(_config(tmp_path, num_queries=9)).dataset("train")


def test_runlocal_config_trains(tmp_path):
  config = _config(tmp_path / "cache")
  # One variant (tests/lra/runlocal_support.py says which and why); the config's attention argument: below.
  attention_name = RUNLOCAL_ATTENTION_OF["mqar"]
  config.model.attention = mqar_config.get_config(f"runlocal,attention={attention_name}").model.attention
  assert config.model.attention.name == attention_name
  final = train_and_evaluate(config, tmp_path / "run")
  for split in ("validation", "test"):
    assert 0.0 <= final[split]["accuracy"] <= 1.0 and np.isfinite(final[split]["loss"])


def test_config_arguments_are_strict():
  assert mqar_config.get_config().data.generate.num_kv_pairs == 64
  assert mqar_config.get_config("runlocal,attention=linear").model.attention.name == "linear"
  with pytest.raises(ValueError, match="unknown config argument"):
    mqar_config.get_config("runlocal,length=3")
