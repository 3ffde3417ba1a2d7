"""The gated / delta-rule layers beyond the contract suite (issue 35): the short causal convolution and its decode
state, RetNet's decays, each paper's layer structure, and the sequence-parallel forms of both cores on 8 fake CPU
devices (one subprocess: values and gradients against the unsharded core, a length the mesh does not divide,
padding)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention.retnet import retnet_log_decays
from attention.short_conv import ShortConv

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_short_conv_is_causal_masks_padding_and_decodes_like_the_parallel_form():
  x = jax.random.normal(jax.random.key(0), (2, 7, 3))
  mask = jnp.arange(7)[None] != jnp.array([[2], [9]])  # row 0: position 2 is padding
  conv = ShortConv(kernel_size=3)
  params = conv.init(jax.random.key(1), x)
  jac = jax.jit(jax.jacrev(lambda x: conv.apply(params, x, mask)[0]))(x)[:, :, 0]  # [L, C, L, C]
  dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))
  np.testing.assert_array_equal(dep[np.triu_indices(7, 1)], 0.0)  # causal
  np.testing.assert_array_equal(dep[:, 2], 0.0)  # the padded input reaches no output
  assert dep[4, 3] > 0 and dep[4, 2 - 0] == 0 and dep[6, 4] > 0 and dep[6, 3] == 0  # 3 taps: t sees t-2..t
  decoder = ShortConv(kernel_size=3, decode=True)
  cache = decoder.init(jax.random.key(1), x)["cache"]
  step = jax.jit(lambda cache, x_t, m_t: decoder.apply({**params, "cache": cache}, x_t, m_t, mutable=["cache"]))
  outs = []
  for t in range(7):
    y, mutated = step(cache, x[:, t:t + 1], mask[:, t:t + 1])
    cache = mutated["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), conv.apply(params, x, mask), atol=1e-6)


def test_retnet_decays_are_the_papers():
  np.testing.assert_allclose(np.exp(retnet_log_decays(4)), 1 - 2.0 ** (-5 - np.arange(4)), rtol=1e-12)


PARAMS = {  # parameters each paper's layer has (beside query/key/value/out)
    "retnet": {"gate", "head_norm"},
    "gla": {"gate_down", "gate_up", "gate", "head_norm"},
    "mamba2": {"gate", "conv", "dt", "dt_bias", "A_log", "D", "norm_scale"},
    "deltanet": {"q_conv", "k_conv", "v_conv", "beta", "head_norm"},
    "gated_deltanet": {"q_conv", "k_conv", "v_conv", "beta", "alpha", "dt_bias", "A_log", "gate", "head_norm"},
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_layer_structure_follows_the_paper(name):
  x = jnp.ones((1, 8, 16))
  shapes = jax.eval_shape(attention.build(name, num_heads=2).init, jax.random.key(0), x)["params"]
  assert PARAMS[name] | {"query", "key", "value", "out"} == set(shapes), sorted(shapes)


def test_options_out_of_range_are_refused():
  with pytest.raises(ValueError, match="d_state must be >= 1"):
    attention.build("mamba2", d_state=0)
  with pytest.raises(ValueError, match="norm"):
    attention.build("gla", norm="batch")


# ----------------------------------------------------------------------------------------------------------------------
# Sequence parallel on 8 fake devices (data=2, sequence=4): this file run as a script is the subprocess.


def _sequence_parallel_cases() -> list[dict]:
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  from kernels import sequence  # pylint: disable=import-outside-toplevel
  from kernels.delta_rule import delta_rule_attention  # pylint: disable=import-outside-toplevel
  from kernels.delta_rule.sequence_parallel import delta_rule_sequence_parallel  # pylint: disable=import-outside-toplevel
  from kernels.gated_linear import gated_linear_attention  # pylint: disable=import-outside-toplevel
  from kernels.gated_linear.sequence_parallel import gated_linear_sequence_parallel  # pylint: disable=import-outside-toplevel

  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2).T, ("data", "sequence"))
  b, length, h, dk, dv = 2, 21, 2, 4, 3  # 21 tokens over 4 shards: padded inside the form
  ks = jax.random.split(jax.random.key(0), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  q, k = (unit(jax.random.normal(x, (b, length, h, dk))) for x in ks[:2])
  v = jax.random.normal(ks[2], (b, length, h, dv))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, length, h)))
  mask = jnp.arange(length)[None] < jnp.array([[13], [length]])
  ct = jax.random.normal(ks[4], (b, length, h, dv))
  cases = []
  for form in ("per_head", "per_key", "delta", "gated_delta"):
    g = -jax.nn.softplus(jax.random.normal(ks[5], (b, length, h, dk) if form == "per_key" else (b, length, h)))

    # XLA's chunked forms on both sides: what the shards exchange does not depend on the form, and the default
    # dispatch would also trace the GPU and TPU kernels (4x the time; tests/kernels compares the forms).
    def core(q, k, v, g, beta, sharded, form=form):
      if form in ("per_head", "per_key"):
        f = gated_linear_sequence_parallel if sharded else gated_linear_attention
        return f(q, k, v, g, key_mask=mask, chunk_size=4, implementation="xla")
      f = delta_rule_sequence_parallel if sharded else delta_rule_attention
      return f(q, k, v, beta, g if form == "gated_delta" else None, key_mask=mask, chunk_size=4,
               implementation="xla")

    def loss(q, k, v, g, beta, sharded, core=core):
      if not sharded:
        return jnp.sum(core(q, k, v, g, beta, False) * ct)
      with sequence.use_mesh(mesh):
        return jnp.sum(core(*(sequence.constrain(t) for t in (q, k, v, g, beta)), True) * ct)

    (l1, g1), (l0, g0) = [jax.jit(jax.value_and_grad(lambda *a, s=s: loss(*a, s), argnums=(0, 1, 2, 3, 4)))(
        q, k, v, g, beta) for s in (True, False)]
    rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))  # noqa: E731
    cases.append({"form": form, "loss": rel(l1, l0), "grads": max(rel(a, c) for a, c in zip(g1, g0))})
  return cases


def test_sequence_parallel_forms_equal_one_device():
  from tests.conftest import xla_flags  # pylint: disable=import-outside-toplevel  (this file is also the subprocess)
  env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve())], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cases = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [c["form"] for c in cases] == ["per_head", "per_key", "delta", "gated_delta"], proc.stdout
  for case in cases:
    assert case["loss"] < 1e-5 and case["grads"] < 1e-5, case


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  jax.config.update("jax_disable_most_optimizations", True)  # tiny programs: compile time dominates
  for c in _sequence_parallel_cases():
    print(json.dumps(c), flush=True)
