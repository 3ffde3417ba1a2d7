"""Self-pretraining then fine-tuning in one run: the objective learns, fine-tuning starts from the pretrained encoder
(by value), padding is never masked nor predicted, a kill inside either phase resumes bit-identically, init_from.
One uninterrupted run (the `straight` fixture) is checked end to end and is the reference of the resumed one."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lra.models.encoder import Encoder
from lra.models.heads import SelfPretrainingModel
from lra.tasks import pipeline
from lra.tasks.retrieval import Retrieval
from lra.training import Experiment, train_and_evaluate
from lra.training import checkpoints as checkpoints_lib
from lra.training import pretrain as pretrain_lib
from lra.training.metric_writers import read_metrics
from lra.training.trainer import STEPS_PER_SECOND
from tests.conftest import tiny_listops_config


def _config(cache, *, pretrain_steps=12, num_steps=6, **train):
  config = tiny_listops_config(cache, num_steps=num_steps, checkpoint_every_steps=4, eval_every_steps=6,
                               log_every_steps=2, **train)
  config.pretrain.update(steps=pretrain_steps, learning_rate=1e-2, schedule="constant", warmup_steps=1)
  return config


def _params(config, directory):
  exp = Experiment(config)
  ckpt = checkpoints_lib.Checkpoints(directory)
  try:
    state, meta = ckpt.restore(exp.init_state(), "latest")
  finally:
    ckpt.close()
  return jax.device_get(state.params), meta


def _encoder_params(path):
  return checkpoints_lib.read_params(path)[0]["encoder"]


def _allclose(a, b, atol):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.allclose(x, y, atol=atol)), a, b)))


@pytest.fixture(scope="module")
def straight(data_cache, tmp_path_factory):
  """(config, workdir) of one uninterrupted run: 40 pretraining steps, then 12 fine-tuning steps at a negligible rate
  (its encoder after fine-tuning is, to ~1e-6, the one it started from), dropout on (its keys and the masking keys
  must be resumed too), checkpoints every 10 steps and at each phase's last step, evaluation at each phase's last
  step. Both tests below check it."""
  config = _config(data_cache, pretrain_steps=40, num_steps=12, learning_rate=1e-7, warmup_steps=1)
  config.train.update(checkpoint_every_steps=10, eval_every_steps=1000)
  config.model.dropout_rate = 0.1
  workdir = tmp_path_factory.mktemp("pretrain_straight")
  train_and_evaluate(config, workdir)
  return config, workdir


def test_pretraining_then_finetuning_end_to_end(data_cache, straight, tmp_path):
  config, workdir = straight
  records = read_metrics(workdir)
  assert {r["phase"] for r in records} == {"pretrain", "finetune"}
  pre = [r for r in records if r["phase"] == "pretrain" and r["split"] == "train"]
  assert [r["step"] for r in pre] == list(range(2, 41, 2))
  first, last = np.mean([r["loss"] for r in pre[:2]]), np.mean([r["loss"] for r in pre[-2:]])
  assert last < first - 0.2, (first, last)  # the denoising objective learns
  assert {(r["step"], r["split"]) for r in records if r["phase"] == "finetune"} >= {(12, "train"), (12, "test")}
  assert (workdir / "pretrain" / "checkpoints" / "40").exists() and (workdir / "checkpoints" / "12").exists()
  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["pretrain"]["steps"] == 40 and recorded["train"]["num_steps"] == 12
  assert json.loads((workdir / "pretrain" / "config.json").read_text())["train"]["num_steps"] == 40

  pretrained = _encoder_params(workdir / "pretrain")
  finetuned = _params(config, workdir)[0]["encoder"]
  fresh = jax.device_get(Experiment(config).init_state().params["encoder"])
  assert _allclose(finetuned, pretrained, atol=1e-5)
  assert not _allclose(finetuned, fresh, atol=1e-2)  # and not the seed's initialisation

  # init_from: another run starts its fine-tuning from this run's pretrained encoder (by value); shapes must match.
  other = tiny_listops_config(data_cache, num_steps=1, learning_rate=1e-7, warmup_steps=1)
  other.init_from = str(workdir / "pretrain")
  train_and_evaluate(other, tmp_path / "other")
  assert _allclose(_params(other, tmp_path / "other")[0]["encoder"], pretrained, atol=1e-5)
  wider = tiny_listops_config(data_cache, num_steps=1)
  wider.model.mlp_dim = 48
  wider.init_from = str(workdir)
  with pytest.raises(ValueError, match=r"config.init_from=.*encoder does not fit.*block_0/mlp.*shape"):
    train_and_evaluate(wider, tmp_path / "wider")


def _tiny_model(objective="masked", mask_rate=1.0, vocab=11):
  encoder = Encoder(vocab_size=vocab, max_length=8, emb_dim=8, num_layers=1, num_heads=1, qkv_dim=8, mlp_dim=8,
                    dropout_rate=0.0, attention_dropout_rate=0.0, pooling="cls", sequence_output=True,
                    causal=objective == "causal", attention=ml_collections.FrozenConfigDict({"name": "softmax"}))
  return SelfPretrainingModel(encoder=encoder, vocab_size=vocab, objective=objective, mask_rate=mask_rate,
                              mask_token=0)


def test_masked_objective_never_masks_or_predicts_padding():
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 11, (64, 8)), jnp.int32)
  real = jnp.arange(8)[None, :] < jnp.asarray(np.random.RandomState(1).randint(1, 9, (64, 1)))
  tokens = jnp.where(real, tokens, 0)
  batch = {"inputs": tokens, "mask": real}
  for rate in (1.0, 0.5):
    model = _tiny_model(mask_rate=rate)
    variables = model.init({"params": jax.random.key(0)}, batch)
    for step in range(3):
      rngs = {"dropout": jax.random.key(step)}
      out = model.apply(variables, batch, train=True, rngs=rngs)
      weights = np.asarray(out["weights"])
      assert not weights[~np.asarray(real)].any()  # padding is never predicted
      if rate == 1.0:
        np.testing.assert_array_equal(weights, np.asarray(real, np.float32))  # every real token is
      corrupted, selected = model.apply(variables, tokens, real, True, rngs=rngs, method=SelfPretrainingModel._corrupt)
      assert not np.asarray(selected)[~np.asarray(real)].any()
      np.testing.assert_array_equal(np.asarray(corrupted)[~np.asarray(real)], np.asarray(tokens)[~np.asarray(real)])
    assert 0.3 < float(np.asarray(selected)[np.asarray(real)].mean()) < 0.7 or rate == 1.0
  # The causal objective predicts token t+1 at t: no loss where t+1 is padding.
  model = _tiny_model("causal")
  variables = model.init({"params": jax.random.key(0)}, batch)
  out = model.apply(variables, batch)
  expected = np.asarray(real)[:, :-1] & np.asarray(real)[:, 1:]
  np.testing.assert_array_equal(np.asarray(out["weights"])[:, :-1], expected)
  assert not np.asarray(out["weights"])[:, -1].any()
  np.testing.assert_array_equal(np.asarray(out["targets"])[:, :-1], np.asarray(tokens)[:, 1:])


def test_retrieval_pretrains_on_both_documents():
  config = ml_collections.ConfigDict({"data": {"max_length": 8}, "model": {}})
  assert Retrieval(config).pretrain_token_keys() == (("inputs1", "mask1"), ("inputs2", "mask2"))
  model = _tiny_model()
  model = model.clone(token_keys=(("inputs1", "mask1"), ("inputs2", "mask2")))
  tokens = jnp.ones((3, 8), jnp.int32)
  batch = {"inputs1": tokens, "mask1": tokens > 0, "inputs2": tokens + 1, "mask2": tokens > 0}
  out = model.apply(model.init({"params": jax.random.key(0)}, batch), batch)
  assert out["logits"].shape == (6, 8, 11)
  np.testing.assert_array_equal(np.asarray(out["targets"])[3:], 2)  # the second document's tokens


def test_resume_inside_each_phase_is_bit_identical(straight, tmp_path, monkeypatch):
  config, straight_dir = straight

  original = pipeline.TrainBatches.__getitem__
  calls = {"n": 0, "crash_at": 12}  # the 12th batch: pretraining step 12 (its checkpoint is at step 10)

  def crash(self, index):
    calls["n"] += 1
    if calls["n"] == calls["crash_at"]:
      raise KeyboardInterrupt("simulated crash")
    return original(self, index)

  monkeypatch.setattr(pipeline.TrainBatches, "__getitem__", crash)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, tmp_path / "resumed")
  assert not (tmp_path / "resumed" / "checkpoints" / "10").exists()
  # Second kill inside fine-tuning: pretraining resumes at 10 (30 more batches), fine-tuning crashes at its step 12.
  calls.update(n=0, crash_at=30 + 12)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, tmp_path / "resumed")
  assert (tmp_path / "resumed" / "checkpoints" / "10").exists()
  monkeypatch.setattr(pipeline.TrainBatches, "__getitem__", original)
  train_and_evaluate(config, tmp_path / "resumed")

  for sub in ("", "pretrain"):
    phase_config = pretrain_lib.phase_config(config) if sub else config
    if sub:  # the pretraining checkpoints hold the pretraining model's state
      exp = Experiment(phase_config, task=pretrain_lib.PretrainTask(Experiment(config).task, config))
      states = []
      for run in (straight_dir, tmp_path / "resumed"):
        ckpt = checkpoints_lib.Checkpoints(run / sub)
        try:
          states.append(jax.device_get(ckpt.restore(exp.init_state(), "latest")[0].params))
        finally:
          ckpt.close()
      jax.tree.map(np.testing.assert_array_equal, *states)
    else:
      p1, _ = _params(config, straight_dir)
      p2, _ = _params(config, tmp_path / "resumed")
      jax.tree.map(np.testing.assert_array_equal, p1, p2)
  drop_timing = lambda records: [{k: v for k, v in r.items() if k != STEPS_PER_SECOND} for r in records]  # noqa: E731
  assert drop_timing(read_metrics(straight_dir)) == drop_timing(read_metrics(tmp_path / "resumed"))
