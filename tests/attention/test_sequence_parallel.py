"""Sequence-sharded contract case for every registered variant: the layer called on 8 fake CPU devices with its input
sharded along the length (`data=2, sequence=4`, `kernels.sequence.use_mesh`) has the values and gradients (of the
parameters and of the input) of the unsharded layer, non-causal with attention dropout and causal without, with
padding. Padding and causality of the sharded layer are checked by gradients as in the contract suite.

All cases run in ONE subprocess (jax must see 8 devices before it starts); `python tests/attention/
test_sequence_parallel.py` is that subprocess and prints one JSON line per case. Kernel-level checks of the ring and
the state passing (against the unsharded cores) are in the same run.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 900
# Tolerance of the float32 comparisons: relative to the largest magnitude of the unsharded result.
RTOL = 1e-5
CUT = 19  # causal cases: the last output position in the loss (shards hold 8 positions at length 32)
# Small blocks so banded and block patterns span several shards at length 32.
OPTIONS = {"local": dict(block_size=4), "longformer": dict(block_size=4, num_dilated_heads=0),
           "sparse_transformer": dict(block_size=4), "bigbird": dict(block_size=4, num_random_blocks=1),
           "transnormer": dict(block_size=4), "linformer": dict(k=8), "reformer": {}, "based": dict(window=4)}
# Content-adaptive sparsity (issue 34): blocks of 4 at length 32, so selections cross shards (the exact fallback).
OPTIONS.update(nsa=dict(compress_block=4, compress_stride=2, select_block=4, num_selected=3, num_local_blocks=1,
                        window=4, num_kv_heads=1), moba=dict(block_size=4, top_k=2), compressed=dict(factor=4),
               routing=dict(num_clusters=4, local_window=4, num_local_heads=1))
# Extra option sets checked beside the defaults (other sequence-parallel forms of the same variant).
EXTRA = {"transnormer": [dict(block_size=4, mode="diag")], "based": [dict(window=4, mode="taylor")]}


def _cases(names):
  for name in names:
    for options in [OPTIONS.get(name, {}), *EXTRA.get(name, [])]:
      yield name, options


def _run_cases() -> list[dict]:
  import attention
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from kernels import sequence

  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2).T, ("data", "sequence"))
  b, length, features, real = 2, 32, 16, 21
  x = jax.random.normal(jax.random.key(0), (b, length, features))
  mask = jnp.arange(length)[None, :] < jnp.array([[real], [length]])
  weights = jax.random.normal(jax.random.key(1), x.shape) * mask[..., None]
  results = []

  def compare(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    return float(np.abs(a - b).max() / scale)

  only = [n for n in os.environ.get("SEQPAR_NAMES", "").split(",") if n]  # a subset, to rerun by hand
  for name, options in _cases(sorted(n for n in attention.names() if not only or n in only)):
    cls = attention.get_class(name)
    # Non-causal with attention dropout (train mode), and causal (where the variant can be) without.
    settings = [(False, 0.1)] + ([(True, 0.0)] if cls.supports_causal else [])
    for causal, rate in settings:
      case = {"name": name, "options": options, "causal": causal, "dropout_rate": rate}
      # Causal: only outputs up to CUT enter the loss, so inputs after CUT (other shards) must get no gradient.
      w = weights.at[:, CUT + 1:].set(0.0) if causal else weights
      try:
        layer = attention.build(name, num_heads=2, causal=causal, dropout_rate=rate, **options)
        variables = jax.jit(layer.init)({"params": jax.random.key(2), "attention": jax.random.key(3)}, x)
        rngs = {"attention": jax.random.key(4), "dropout": jax.random.key(5)}

        def loss(params, x, sharded, layer=layer, w=w, rate=rate, variables=variables):
          def f(params, x):  # gradients of the parameters (other collections, e.g. int counters, are held fixed)
            y = layer.apply({**variables, "params": params}, x, mask=mask, deterministic=rate == 0.0, rngs=rngs)
            return jnp.sum(y.astype(jnp.float32) * w)
          if not sharded:
            return f(params, x)
          with sequence.use_mesh(mesh):
            return f(params, sequence.constrain(x))

        shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P("data", "sequence")))
        grad = lambda sharded: jax.jit(jax.value_and_grad(  # noqa: E731
            lambda v, x: loss(v, x, sharded), argnums=(0, 1)), in_shardings=shardings)(variables["params"], x)
        (l1, (gv1, gx1)), (l0, (gv0, gx0)) = grad(True), grad(False)
        case["loss"] = compare(l1, l0)
        # Parameter gradients: the largest difference over all leaves relative to the largest gradient.
        diffs = [np.abs(np.asarray(a) - np.asarray(b)).max()
                 for a, b in zip(jax.tree.leaves(gv1), jax.tree.leaves(gv0))]
        scale = max(np.abs(np.asarray(b)).max() for b in jax.tree.leaves(gv0))
        case["grad_params"] = float(max(diffs) / max(scale, 1e-30))
        case["grad_x"] = compare(gx1, gx0)
        gx1 = np.asarray(gx1)
        # Padding: nothing flows to padded inputs of row 0; real positions do depend on each other.
        case["padding_leak"] = float(np.abs(gx1[0, real:]).max())
        case["real_grad"] = float(np.abs(gx1[0, :min(real, CUT)]).sum())
        if causal:
          case["future_leak"] = float(np.abs(gx1[:, CUT + 1:]).max())
      except Exception as e:  # reported per case, so one variant's failure names itself
        case["error"] = f"{type(e).__name__}: {e}"[:2000]
      results.append(case)
      print(json.dumps(case), flush=True)
  if not only:
    results += _kernel_cases(mesh, compare)
  return results


def _kernel_cases(mesh, compare) -> list[dict]:
  """The shard_map'd cores against their unsharded references: the ring with attention dropout (the counter hash
  keyed by global positions), causal and not, at a length 2 * mesh.sequence does not divide; state passing."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from kernels import sequence
  from kernels.linear_attention import linear_attention_reference
  from kernels.linear_attention.sequence_parallel import linear_attention_sequence_parallel
  from kernels.softmax import sequence_parallel as ring, softmax_attention

  b, length, h, d = 2, 21, 2, 8
  keys = jax.random.split(jax.random.key(7), 4)
  q, k, v = (jax.random.normal(key, (b, length, h, d)) for key in keys[:3])
  mask = jnp.arange(length)[None] < jnp.array([[13], [length]])
  ct = jax.random.normal(keys[3], (b, length, h, d)) * mask[..., None, None]
  out = []
  for causal in (False, True):
    cores = {
        "kernel:ring": (lambda q, k, v, sharded, causal=causal: ring.ring_attention(
            q, k, v, key_mask_BxL=mask, causal=causal, dropout_rate=0.2, dropout_rng=jax.random.key(9))
            if sharded else softmax_attention(q, k, v, key_mask=mask, causal=causal, implementation="reference",
                                              dropout_rate=0.2, dropout_rng=jax.random.key(9))),
        "kernel:state": (lambda q, k, v, sharded, causal=causal: (
            linear_attention_sequence_parallel if sharded else linear_attention_reference)(
                jax.nn.elu(q) + 1, jax.nn.elu(k) + 1, v * mask[..., None, None], causal=causal)),
    }
    for name, core in cores.items():
      def loss(q, k, v, sharded, core=core):
        if not sharded:
          return jnp.sum(core(q, k, v, False) * ct)
        with sequence.use_mesh(mesh):
          return jnp.sum(core(*(sequence.constrain(t) for t in (q, k, v)), True) * ct)
      # Inputs arrive whole (21 positions do not divide over 4 devices); `sequence.constrain` shards them inside.
      res = [jax.jit(jax.value_and_grad(lambda *a, s=s: loss(*a, s), argnums=(0, 1, 2)))(q, k, v)
             for s in (True, False)]
      (l1, g1), (l0, g0) = res
      case = {"name": name, "causal": causal, "loss": compare(l1, l0),
              "grads": max(compare(a, b) for a, b in zip(g1, g0))}
      out.append(case)
      print(json.dumps(case), flush=True)
  return out


@pytest.fixture(scope="module")
def results():
  from tests.conftest import xla_flags  # pylint: disable=import-outside-toplevel  (this file is also the subprocess)
  env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # plugins' folders
  proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve())], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], proc.stderr


def _names():
  import attention
  return attention.names()


@pytest.mark.parametrize("name", _names())
def test_sequence_sharded_layer_matches_unsharded(results, name):
  cases = [c for c in results[0] if c["name"] == name]
  assert cases, f"no sequence-parallel case ran for {name}"
  for case in cases:
    assert "error" not in case, case
    label = f"{name} {case['options']} causal={case['causal']} dropout={case['dropout_rate']}"
    for key in ("loss", "grad_params", "grad_x"):
      assert case[key] <= RTOL, f"{label}: {key} differs by {case[key]:.2e} (relative)"
    assert case["padding_leak"] == 0.0, f"{label}: padded inputs reach real outputs"
    assert case["real_grad"] > 0
    if case["causal"]:
      assert case["future_leak"] == 0.0, f"{label}: outputs up to {CUT} depend on later inputs"


@pytest.mark.parametrize("core", ["kernel:ring", "kernel:state"])
def test_sequence_parallel_cores_match_their_references(results, core):
  cases = [c for c in results[0] if c["name"] == core]
  assert len(cases) == 2, cases
  for case in cases:
    assert case["loss"] <= RTOL and case["grads"] <= RTOL, case


def test_each_sharded_variant_logs_its_form(results):
  """Every variant's form is logged once with its reason: ring, state passing, or the exact fallback."""
  log = results[1]
  assert "ring attention" in log and "state passing" in log and "exact fallback" in log, log[-2000:]


if __name__ == "__main__":
  _run_cases()
