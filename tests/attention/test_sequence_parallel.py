"""Sequence-sharded contract case for every registered variant: the layer called on 8 fake CPU devices with its input
sharded along the length (`data=2, sequence=4`, `kernels.sequence.use_mesh`) has the values and gradients (of the
parameters and of the input) of the unsharded layer, non-causal with attention dropout and causal without, with
padding. Padding and causality of the sharded layer are checked by gradients as in the contract suite.

Every option a sequence-parallel form receives is exercised (never dropped): relative positions (ALiBi, RoPE) on
every variant that takes them, an explicit `implementation` per form (the Pallas kernels in interpret mode: run by
the halo and state forms, refused in one line by the ring), per-variant options (`OPTIONS`, `EXTRA`). Each case
records which form actually ran (`kernels.sequence.recording`), and `expected_forms` says which must: local and
Longformer exchange halos without dropout (no silent all-gather), softmax runs the ring, the linear family passes
states.

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
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 1200  # hard limit of the 8-device subprocess (a few minutes on an idle 2-core machine)
# Tolerance of the float32 comparisons: relative to the largest magnitude of the unsharded result.
RTOL = 1e-5
CUT = 19  # causal cases: the last output position in the loss (shards hold 8 positions at length 32)
# Small blocks so banded and block patterns span several shards at length 32.
OPTIONS = {"local": dict(block_size=4), "longformer": dict(block_size=4, num_dilated_heads=0),
           "sparse_transformer": dict(block_size=4), "bigbird": dict(block_size=4, num_random_blocks=1),
           "transnormer": dict(block_size=4), "linformer": dict(k=8), "reformer": {}, "based": dict(window=4)}
# Flex's ring: a window crossing shards, document ids (from the padding mask) and a learned bias table (its gradient
# through the ring), all at global positions; one key/value head (multi-query attention).
OPTIONS["flex"] = dict(mask="and_masks", masks=("sliding_window", "document"), window=6, score="relative_bias",
                       num_kv_heads=1)
# Content-adaptive sparsity (issue 34): blocks of 4 at length 32, so selections cross shards (the exact fallback);
# nsa's 2-query chunks put its compressed branch in causal segments (`adaptive_sparse.causal_segments`) here too.
OPTIONS.update(nsa=dict(compress_block=4, compress_stride=2, select_block=4, num_selected=3, num_local_blocks=1,
                        window=4, num_kv_heads=1, query_chunk=2), moba=dict(block_size=4, top_k=2), compressed=dict(factor=4),
               routing=dict(num_clusters=4, local_window=4, num_local_heads=1))
# Extra option sets checked beside the defaults (other sequence-parallel forms of the same variant, explicit
# implementations: the Pallas kernels in interpret mode), each with the (causal, dropout_rate) settings it runs in
# (None: the default settings).
CAUSAL_ONLY = [(True, 0.0)]
# Based's Taylor mode alone is causal only: its non-causal state passing is the hybrid mode's linear part (that case).
EXTRA = {"transnormer": [(dict(block_size=4, mode="diag"), None)],
         "based": [(dict(window=4, mode="taylor"), CAUSAL_ONLY)],
         # The ring on the interpreted Pallas kernels is slow to compile: its values and gradients are checked at
         # kernel level ("kernel:ring_pallas"), here its refusal of attention dropout.
         "softmax": [(dict(implementation="reference"), CAUSAL_ONLY),
                     (dict(implementation="interpret"), [(False, 0.1)])],
         "local": [(dict(block_size=8, window=2, implementation="interpret"), CAUSAL_ONLY)],
         # The paper's causal Longformer: no global blocks, the last head dilated (a causal window may be even).
         "longformer": [(dict(block_size=4, window=2, num_dilated_heads=1, dilation=2, num_global_blocks=0),
                         CAUSAL_ONLY)],
         "linear": [(dict(implementation="interpret"), None)],
         "flex": [(dict(implementation="interpret"), [(False, 0.1)])]}  # refused: the ring has no Pallas path
# Variants whose causal ring runs in their relative-position cases (RoPE: no bias, ALiBi: a bias), not again without.
CAUSAL_BY_POSITIONS = ("softmax",)
# Variants whose halo form serves only calls without attention dropout: also run non-causal without it.
# (Softmax's ring serves dropout too: its causal case is the one without.)
WITHOUT_DROPOUT = ("local", "longformer")


def _cases(attention, names):
  """`(name, options, positions, settings)`: each option set without relative positions, then the variant's tiny
  options with each relative position it takes (`settings`: the (causal, dropout_rate) pairs it runs in, or None:
  the defaults, "first" for the variant's own tiny options without positions)."""
  for name in names:
    for options, settings in [(OPTIONS.get(name, {}), "first"), *EXTRA.get(name, [])]:
      yield name, options, "none", settings
    supported = attention.get_class(name).supported_positions
    if not isinstance(supported, (tuple, list)):  # a property of the instance (it depends on the options)
      supported = attention.build(name, num_heads=2, **OPTIONS.get(name, {})).supported_positions
    # One setting per relative position (causal where the variant can be; the bug of issue 32, the ring dropping
    # ALiBi's slopes, shows causal and not: the non-causal ring with ALiBi and dropout is "kernel:ring_alibi"'s).
    one = CAUSAL_ONLY if attention.get_class(name).supports_causal else [(False, 0.1)]
    for positions in supported:
      # RoPE rotates queries and keys at global positions in the layer, before any core: softmax's RoPE case checks
      # that code through a ring; flex's ring receives the same rotated inputs (its ALiBi case is its own code).
      if positions != "none" and (name, positions) != ("flex", "rope"):
        yield name, OPTIONS.get(name, {}), positions, one


def _exact_fallback_only(attention, name: str, options: dict) -> bool:
  """A variant whose every setting runs the exact fallback and nothing else (`expected_forms`: no ring, halo or state
  form of its own in any setting, e.g. not Based's hybrid, whose linear part passes states)."""
  declared = attention.build(name, num_heads=2, **options).sequence_parallel_form()
  return all(expected_forms(name, options, causal, rate, declared) == {"fallback"}
             for causal, rate in ((False, 0.1), (True, 0.0), (False, 0.0)))


def expected_forms(name: str, options: dict, causal: bool, rate: float, declared: str | None) -> set[str]:
  """The sequence-parallel forms a case must have recorded (`kernels.sequence.FORMS`). Layers whose own work GSPMD
  partitions (declared "psum", "gspmd", grassmann's "halo") record none."""
  if name in ("softmax", "flex"):
    return {"ring"}
  if name in ("local", "longformer"):
    return {"halo"} if rate == 0.0 else {"fallback"}
  if name in ("sparse_transformer", "bigbird"):  # strided / random blocks: not a band
    return {"fallback"}
  if name in ("linear", "performer") or (name == "transnormer" and options.get("mode", "norm") == "norm"):
    return {"state"}
  if name == "based":
    return {"hybrid": {"fallback", "state"}, "taylor": {"state"}, "window": {"fallback"}, "conv": set()}[
        options.get("mode", "hybrid")]
  if name in ("linformer", "grassmann"):
    return set()
  # Any other variant (plugins, new variants): what it declares, the core forms recorded by their cores.
  return {"fallback"} if declared is None else ({declared} if declared in ("ring", "halo", "state") else set())


# Fallback-only variants whose values are still compared sharded against one device (the generic fallback on a plain
# layer, a layout-based one, a content-adaptive one); the other built-in fallback-only variants are lowered only.
VALUE_CHECKED_FALLBACKS = ("additive", "bigbird", "nsa")
FULL = os.environ.get("SEQPAR_FULL", "0") == "1"  # every case compared by value (the full matrix, by hand)
# The gated / delta-rule linear family ignores `causal` and `dropout_rate` (attention/gated_recurrent.py: its mixer is
# causal whatever the setting, with no weights to drop): its non-causal case with dropout traces the very programs of
# its causal case. Checked per run (`_programs`: the sharded and one-device jaxprs of both settings are equal), the
# causal case's value check then covers it; where they differ, it is value-checked itself.
SAME_PROGRAM_SETTINGS = ("deltanet", "gated_deltanet", "gla", "mamba2", "retnet")
REAL = 21  # real tokens of row 0 (row 1 is all real)


def _built_in(attention, name: str) -> bool:
  return attention.get_class(name).__module__.startswith("attention.")


def _compare(a, b) -> float:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _lower_sharded(layer, mesh, x, mask, w, rate) -> dict:
  """Traces and lowers (does not compile) the sharded value-and-gradient program of `layer` from abstract variables;
  returns the forms its cores recorded."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from kernels import sequence

  keys = {"params": jax.random.key(2), "attention": jax.random.key(3)}
  abstract = jax.eval_shape(layer.init, keys, x)
  others = {k: v for k, v in abstract.items() if k != "params"}
  rngs = {"attention": jax.random.key(4), "dropout": jax.random.key(5)}

  def loss(params, others, x):
    with sequence.use_mesh(mesh):
      y = layer.apply({**others, "params": params}, sequence.constrain(x), mask=mask, deterministic=rate == 0.0,
                      rngs=rngs)
    return jnp.sum(y.astype(jnp.float32) * w)

  rep, seq = NamedSharding(mesh, P()), NamedSharding(mesh, P("data", "sequence"))
  with sequence.recording() as ran:
    jax.jit(jax.value_and_grad(loss, argnums=(0, 2)), in_shardings=(rep, rep, seq)).lower(
        abstract["params"], others, x)
  return {"forms": sorted({r.form for r in ran if r.form is not None}),
          "details": sorted({f"{r.op}: {r.form}: {r.detail}" for r in ran if r.form is not None})}


def _run_cases() -> list[dict]:
  import attention
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from kernels import sequence

  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2).T, ("data", "sequence"))
  b, length, features = 2, 32, 16
  real = REAL
  x = jax.random.normal(jax.random.key(0), (b, length, features))
  mask = jnp.arange(length)[None, :] < jnp.array([[real], [length]])
  weights = jax.random.normal(jax.random.key(1), x.shape) * mask[..., None]
  results = []

  def compare(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    return float(np.abs(a - b).max() / scale)

  only = [n for n in os.environ.get("SEQPAR_NAMES", "").split(",") if n]  # a subset, to rerun by hand
  inits: dict = {}  # initial variables per (name, options, positions), shared by its settings (`_check_values`)
  programs: dict = {}  # the causal case's `_programs` per (name, options, positions) in SAME_PROGRAM_SETTINGS
  for name, options, positions, given in _cases(attention, sorted(n for n in attention.names()
                                                                  if not only or n in only)):
    # Non-causal with attention dropout (train mode), and causal (where the variant can be) without.
    causal_ok = attention.get_class(name).supports_causal
    settings = [(False, 0.1)] + ([(True, 0.0)] if causal_ok else [])
    if given == "first" and name in CAUSAL_BY_POSITIONS:
      settings = [(False, 0.1)]
    if name in WITHOUT_DROPOUT and given == "first":
      settings.append((False, 0.0))
    # (the variant's own tiny options, and its relative-position cases; not the EXTRA option sets)
    fallback_only = (given == "first" or positions != "none") and _exact_fallback_only(attention, name, options)
    if given == "first" and fallback_only:
      # One generic form (K/V all-gathered, the layer's own code otherwise): one case checks padding, dropout at
      # global positions and (where it can be) causality at once, instead of a compile per setting.
      settings = [(causal_ok, 0.1)]
    settings = settings if given in (None, "first") else given
    # The exact fallback adds no shard_map of its own: the sharded program is the layer's under GSPMD, whose
    # partitioning is exact by construction. Its value check on every built-in variant compiled ~20 large programs
    # twice; representatives keep it (`VALUE_CHECKED_FALLBACKS`, plugins, SEQPAR_FULL=1), the others are traced and
    # lowered sharded (the recorded form and its reason checked, a lowering error caught) without compiling.
    # The same holds for one setting of a variant with a form of its own that takes the fallback in that setting
    # (local and Longformer with attention dropout, Transnormer's diag mode).
    representative = FULL or name in VALUE_CHECKED_FALLBACKS or not _built_in(attention, name)
    same_program = name in SAME_PROGRAM_SETTINGS and not FULL
    if same_program:  # the causal case first: the non-causal one compares its programs with it
      settings = sorted(settings, key=lambda s: not s[0])
    for causal, rate in settings:
      case = {"name": name, "options": options, "positions": positions, "causal": causal, "dropout_rate": rate}
      start = time.perf_counter()  # per-case seconds in the JSON line: where the subprocess's time goes
      # Causal: only outputs up to CUT enter the loss, so inputs after CUT (other shards) must get no gradient.
      w = weights.at[:, CUT + 1:].set(0.0) if causal else weights
      try:
        layer = attention.build(name, num_heads=2, causal=causal, dropout_rate=rate, positions=positions,
                                **options)
        case["declared"] = layer.sequence_parallel_form()
        lower_only = not representative and (fallback_only or expected_forms(
            name, options, causal, rate, case["declared"]) == {"fallback"})
        if lower_only:
          case.update(_lower_sharded(layer, mesh, x, mask, w, rate))
          case["lowered_only"] = True
        else:
          key = (name, json.dumps(options, sort_keys=True), positions)
          init = inits.setdefault(key, {})
          if same_program and not causal and key in programs and _programs(
              case, layer, mesh, x, mask, rate, init["variables"]) == programs[key]:
            case["same_program_as_causal"] = True  # its causal case (value-checked) ran these very programs
          else:
            _check_values(case, layer, mesh, x, mask, w, rate, causal, init)
            if same_program and causal:
              programs[key] = _programs({}, layer, mesh, x, mask, rate, init["variables"])
      except Exception as e:  # reported per case, so one variant's failure names itself
        case["error"] = f"{type(e).__name__}: {e}"[:2000]
      case["seconds"] = round(time.perf_counter() - start, 2)
      results.append(case)
      print(json.dumps(case), flush=True)
  if not only or "kernels" in only:  # SEQPAR_NAMES=kernels: the kernel-level and encoder cases alone
    results += _kernel_cases(mesh, compare)
    results += _encoder_log_cases(mesh)
  return results


def _programs(case, layer, mesh, x, mask, rate, variables) -> tuple[str, str]:
  """The jaxprs of `layer`'s forward pass on one device and sequence-sharded (the forms the sharded trace records
  go into `case`): equal jaxprs of two settings are the same programs, values and gradients alike."""
  import jax

  from kernels import sequence

  rngs = {"attention": jax.random.key(4), "dropout": jax.random.key(5)}
  apply = lambda v, x: layer.apply(v, x, mask=mask, deterministic=rate == 0.0, rngs=rngs)  # noqa: E731
  one = str(jax.make_jaxpr(apply)(variables, x))
  with sequence.recording() as ran, sequence.use_mesh(mesh):
    sharded = str(jax.make_jaxpr(lambda v, x: apply(v, sequence.constrain(x)))(variables, x))
  case["forms"] = sorted({r.form for r in ran if r.form is not None})
  case["details"] = sorted({f"{r.op}: {r.form}: {r.detail}" for r in ran if r.form is not None})
  return one, sharded


def _check_values(case, layer, mesh, x, mask, w, rate, causal, init: dict):
  """The sharded layer's loss and gradients against one device's, padding and causality by gradients. `init`: the
  variables an earlier setting of the same options initialised (reused when this layer's have the same shapes:
  causality and dropout change no variable, so a second setting compiles no init program of its own)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from kernels import sequence

  compare, real = _compare, REAL  # each relative to the largest magnitude of the one-device result
  init_keys = {"params": jax.random.key(2), "attention": jax.random.key(3)}
  if "variables" in init and jax.tree.map(lambda a: (a.shape, a.dtype), init["variables"]) == jax.tree.map(
      lambda a: (a.shape, a.dtype), jax.eval_shape(layer.init, init_keys, x)):
    variables = init["variables"]  # any valid variables serve: both programs below take the same ones
  else:
    variables = init["variables"] = jax.jit(layer.init)(init_keys, x)
  rngs = {"attention": jax.random.key(4), "dropout": jax.random.key(5)}

  def loss(params, x, sharded, layer=layer, w=w, rate=rate, variables=variables):
    def f(params, x):  # gradients of the parameters (other collections, e.g. int counters, are held fixed)
      y = layer.apply({**variables, "params": params}, x, mask=mask, deterministic=rate == 0.0, rngs=rngs)
      terms = y.astype(jnp.float32) * w
      # The loss is a sum of terms of both signs: its rounding is relative to the terms' magnitudes (aux), not to
      # the (possibly cancelled) total.
      return jnp.sum(terms), jnp.sum(jnp.abs(terms))
    if not sharded:
      return f(params, x)
    with sequence.use_mesh(mesh):
      return f(params, sequence.constrain(x))

  shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P("data", "sequence")))
  # The sharded program over the 8-device mesh; the unsharded one on one device (the plain layer: a cheaper
  # compile than an 8-way GSPMD partition of the same program, and the truest reference).
  grad = lambda sharded: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda v, x: loss(v, x, sharded), argnums=(0, 1), has_aux=True),
      **(dict(in_shardings=shardings) if sharded else {}))(variables["params"], x)
  with sequence.recording() as ran:  # what the sharded trace ran, form by form
    try:
      sharded = grad(True)
    finally:
      case["forms"] = sorted({r.form for r in ran if r.form is not None})
      case["details"] = sorted({f"{r.op}: {r.form}: {r.detail}" for r in ran if r.form is not None})
  ((l1, _), (gv1, gx1)), ((l0, magnitude), (gv0, gx0)) = sharded, grad(False)
  case["loss"] = float(abs(float(l1) - float(l0)) / max(float(magnitude), 1e-30))
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
  from attention.positions import alibi_slopes

  b, length, h, d = 2, 21, 2, 8
  slopes = jnp.asarray(alibi_slopes(h))
  keys = jax.random.split(jax.random.key(7), 4)
  q, k, v = (jax.random.normal(key, (b, length, h, d)) for key in keys[:3])
  mask = jnp.arange(length)[None] < jnp.array([[13], [length]])
  ct = jax.random.normal(keys[3], (b, length, h, d)) * mask[..., None, None]
  out = []
  for causal in (False, True):
    cores = {
        # ALiBi at global positions (the slopes pass through the ring), with dropout, at a padded length. (The ring
        # without slopes is the layer cases': softmax's non-causal case with dropout, its causal RoPE case.)
        "kernel:ring_alibi": (lambda q, k, v, sharded, causal=causal: ring.ring_attention(
            q, k, v, key_mask_BxL=mask, causal=causal, dropout_rate=0.2, dropout_rng=jax.random.key(9),
            alibi_slopes=slopes)
            if sharded else softmax_attention(q, k, v, key_mask=mask, causal=causal, implementation="reference",
                                              dropout_rate=0.2, dropout_rng=jax.random.key(9), alibi_slopes=slopes)),
        "kernel:state": (lambda q, k, v, sharded, causal=causal: (
            linear_attention_sequence_parallel if sharded else linear_attention_reference)(
                jax.nn.elu(q) + 1, jax.nn.elu(k) + 1, v * mask[..., None, None], causal=causal)),
    }
    if causal:  # the Pallas kernels (interpret mode) per block pair: causal covers masked and unmasked pairs
      cores["kernel:ring_pallas"] = lambda q, k, v, sharded: ring.ring_attention(
          q, k, v, key_mask_BxL=mask, causal=True, implementation="interpret") if sharded else softmax_attention(
              q, k, v, key_mask=mask, causal=True, implementation="reference")
    for name, core in cores.items():
      def loss(q, k, v, sharded, core=core):
        if not sharded:
          return jnp.sum(core(q, k, v, False) * ct)
        with sequence.use_mesh(mesh):
          return jnp.sum(core(*(sequence.constrain(t) for t in (q, k, v)), True) * ct)
      # Inputs arrive whole (21 positions do not divide over 4 devices); `sequence.constrain` shards them inside.
      start = time.perf_counter()
      res = [jax.jit(jax.value_and_grad(lambda *a, s=s: loss(*a, s), argnums=(0, 1, 2)))(q, k, v)
             for s in (True, False)]
      (l1, g1), (l0, g0) = res
      case = {"name": name, "causal": causal, "loss": compare(l1, l0),
              "grads": max(compare(a, b) for a, b in zip(g1, g0)), "seconds": round(time.perf_counter() - start, 2)}
      out.append(case)
      print(json.dumps(case), flush=True)
  out += _export_cases(mesh)
  return out


def _export_cases(mesh) -> list[dict]:
  """The ring's training step with `implementation="pallas"` exported for cuda and tpu from the fake CPU devices
  (bfloat16, head dim 64, 64-token chunks: the GPU tile): its block pairs reach the platform's kernels, forward and
  backward, inside the shard_map, scan and cond (a lowering error here is what a GPU/TPU user would hit)."""
  import re

  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from kernels import sequence
  from kernels.softmax import sequence_parallel as ring

  spec = jax.ShapeDtypeStruct((2, 2 * 4 * 64, 1, 64), jnp.bfloat16,
                              sharding=NamedSharding(mesh, P("data", "sequence")))

  def step(q, k, v):
    def loss(q, k, v):
      with sequence.use_mesh(mesh):
        return jnp.sum(ring.ring_attention(q, k, v, causal=True, implementation="pallas").astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  out = []
  for platform, target in (("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu_v2")):
    case = {"name": "export:ring_pallas", "platform": platform}
    start = time.perf_counter()
    try:
      exported = jax.export.export(jax.jit(step), platforms=[platform], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call(target)])(spec, spec, spec)
      module = exported.mlir_module()
      case["kernel_calls"] = module.count(f"custom_call @{target}(")
      case["kernels"] = sorted(set(re.findall(r"\b((?:flex|block_sparse)_(?:fwd|bwd_dq|bwd_dkv))\b", module)))
    except Exception as e:  # reported per platform
      case["error"] = f"{type(e).__name__}: {e}"[:2000]
    case["seconds"] = round(time.perf_counter() - start, 2)
    out.append(case)
    print(json.dumps(case), flush=True)
  return out


def _encoder_log_cases(mesh) -> list[dict]:
  """A two-layer encoder per variant run sharded: the log lines it writes about sequence parallelism (one per layer,
  naming the form that ran: BigBird and Sparse Transformer take the fallback and say only that)."""
  import logging

  import jax
  import jax.numpy as jnp
  import ml_collections

  from kernels import sequence
  from lra.models.encoder import Encoder

  lines: list[str] = []

  class Collect(logging.Handler):
    def emit(self, record):
      lines.append(record.getMessage())

  handler = Collect()
  logging.getLogger("kernels").addHandler(handler)
  out = []
  try:
    for name, options in [("bigbird", dict(block_size=4, num_random_blocks=1)),
                          ("sparse_transformer", dict(block_size=4)), ("local", dict(block_size=4)),
                          ("longformer", dict(block_size=4, num_dilated_heads=0))]:
      lines.clear()
      start = time.perf_counter()
      model = Encoder(vocab_size=11, max_length=31, emb_dim=8, num_layers=2, num_heads=2, qkv_dim=8, mlp_dim=8,
                      dropout_rate=0.0, attention_dropout_rate=0.0, pooling="cls",
                      attention=ml_collections.FrozenConfigDict({"name": name, **options}))
      tokens = jnp.ones((2, 31), jnp.int32)
      # The lines are written as the sharded program is traced: it is lowered, not compiled or run (its layers'
      # values are the layer cases' subject).
      params = jax.eval_shape(model.init, jax.random.key(0), tokens)
      with sequence.use_mesh(mesh):
        jax.jit(model.apply).lower(params, tokens)
      case = {"name": f"encoder:{name}", "lines": [l for l in lines if l.startswith("sequence parallel:")],
              "seconds": round(time.perf_counter() - start, 2)}
      out.append(case)
      print(json.dumps(case), flush=True)
  finally:
    logging.getLogger("kernels").removeHandler(handler)
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


def _refused(case: dict) -> str | None:
  """The option value a case must be refused for (a ValueError naming it and mesh.sequence), or None: the ring on
  the Pallas kernels with attention dropout (their counters are a block's own positions)."""
  implementation = case["options"].get("implementation")
  if case["name"] == "softmax" and implementation in ("pallas", "interpret") and case["dropout_rate"] > 0:
    return implementation
  if case["name"] == "flex" and implementation in ("pallas", "interpret"):  # flex's ring runs only the XLA form
    return implementation
  return None


@pytest.mark.parametrize("name", _names())
def test_sequence_sharded_layer_matches_unsharded(results, name):
  cases = [c for c in results[0] if c["name"] == name]
  assert cases, f"no sequence-parallel case ran for {name}"
  for case in cases:
    label = (f"{name} {case['options']} positions={case['positions']} causal={case['causal']} "
             f"dropout={case['dropout_rate']}")
    refused = _refused(case)
    if refused is not None:  # refused in one line naming the option and mesh.sequence, never run without it
      assert "error" in case, f"{label}: ran sharded although the sequence-parallel form cannot honour it"
      assert case["error"].startswith("ValueError") and repr(refused) in case["error"] and \
          "mesh.sequence=4" in case["error"] and "\n" not in case["error"], case["error"]
      continue
    assert "error" not in case, case
    if case.get("lowered_only"):  # a built-in exact-fallback variant: lowered sharded (forms checked below)
      assert name not in VALUE_CHECKED_FALLBACKS and case["forms"] == ["fallback"], case
      continue
    if case.get("same_program_as_causal"):  # its programs equal its causal case's, value-checked in this loop
      assert name in SAME_PROGRAM_SETTINGS and any(
          c["causal"] and "loss" in c and (c["options"], c["positions"]) == (case["options"], case["positions"])
          for c in cases), case
      continue
    for key in ("loss", "grad_params", "grad_x"):
      assert case[key] <= RTOL, f"{label}: {key} differs by {case[key]:.2e} (relative)"
    assert case["padding_leak"] == 0.0, f"{label}: padded inputs reach real outputs"
    assert case["real_grad"] > 0
    if case["causal"]:
      assert case["future_leak"] == 0.0, f"{label}: outputs up to {CUT} depend on later inputs"


@pytest.mark.parametrize("name", _names())
def test_sequence_sharded_layer_runs_its_form(results, name):
  """The form each case ran (recorded by the cores as they are traced, not read from the log) is the one it must:
  local and Longformer without dropout exchange halos (no silent all-gather), softmax runs the ring (ALiBi too), the
  linear family passes states; the exact fallback only where a form cannot serve the options, with its reason."""
  cases = [c for c in results[0] if c["name"] == name and _refused(c) is None]
  assert cases, f"no sequence-parallel case ran for {name}"
  for case in cases:
    assert "forms" in case, case
    label = (f"{name} {case['options']} positions={case['positions']} causal={case['causal']} "
             f"dropout={case['dropout_rate']}")
    expected = expected_forms(name, case["options"], case["causal"], case["dropout_rate"], case.get("declared"))
    hint = "" if case["forms"] else (" (no core recorded a form: a sequence-parallel core calls kernels.sequence.ran("
                                     "op, form, detail) when it is traced)")
    assert set(case["forms"]) == expected, f"{label}: ran {case['details']}, expected {sorted(expected)}{hint}"
    if "fallback" in case["forms"]:  # the fallback says why
      assert all("fallback: " in d and ": the exact fallback" in d for d in case["details"] if ": fallback: " in d), \
          case["details"]


def test_the_forms_that_matter_were_exercised(results):
  """Halo cases ran for local (XLA and Pallas interpret) and Longformer (with global blocks, and causal with dilated
  heads); causal ring cases with ALiBi and RoPE, a non-causal one; state passing through the Pallas kernels."""
  ran = [(c["name"], c.get("forms"), c["options"], c["positions"], c["causal"]) for c in results[0]
         if "positions" in c]  # the layer cases (not the kernel-level and encoder ones)
  halo = [(n, o, causal) for n, f, o, _, causal in ran if f == ["halo"]]
  assert any(n == "local" and o.get("implementation") == "interpret" for n, o, _ in halo), halo
  assert any(n == "longformer" and o.get("num_global_blocks", 1) > 0 for n, o, _ in halo), halo
  assert any(n == "longformer" and causal and o.get("dilation", 1) > 1 for n, o, causal in halo), halo
  ring = {(p, causal) for n, f, _, p, causal in ran if n == "softmax" and f == ["ring"]}
  assert {("none", False), ("alibi", True), ("rope", True)} <= ring, ring
  assert any(n == "linear" and f == ["state"] and o.get("implementation") == "interpret" for n, f, o, _, _ in ran)


@pytest.mark.parametrize("core", ["kernel:ring_alibi", "kernel:ring_pallas", "kernel:state"])
def test_sequence_parallel_cores_match_their_references(results, core):
  cases = [c for c in results[0] if c["name"] == core]
  assert len(cases) == (1 if core == "kernel:ring_pallas" else 2), cases
  for case in cases:
    assert case["loss"] <= RTOL and case["grads"] <= RTOL, case


@pytest.mark.parametrize("name,form", [("bigbird", "fallback"), ("sparse_transformer", "fallback"),
                                       ("local", "halo"), ("longformer", "halo")])
def test_encoder_logs_one_line_per_layer_naming_the_form_that_ran(results, name, form):
  """Issue 32 item 5: the encoder announced "halo" for BigBird and Sparse Transformer, which then logged their exact
  fallback too. Now each layer has one line, and it names the form its core recorded."""
  case = next(c for c in results[0] if c["name"] == f"encoder:{name}")
  for i in range(2):
    mine = [l for l in case["lines"] if f"block_{i}/attention " in l]
    assert len(mine) == 1, case["lines"]
    others = [f for f in ("ring", "halo", "state", "fallback") if f != form]
    assert f"): {form}: " in mine[0] and all(f"): {other}" not in mine[0] for other in others), mine
  assert len(case["lines"]) == 2, case["lines"]  # nothing else announces a form


def test_pallas_ring_lowers_for_cuda_and_tpu(results):
  """An explicit "pallas" ring reaches the platform's kernels when exported for cuda and for tpu (forward: one
  kernel per block pair of hop 0 and of each branch of later hops; backward: dq and dk/dv kernels besides)."""
  cases = [c for c in results[0] if c["name"] == "export:ring_pallas"]
  assert {c["platform"] for c in cases} == {"tpu", "cuda"}, cases
  for case in cases:
    assert "error" not in case, case
    assert case["kernel_calls"] >= 3 * 7, case  # 7 block pairs traced, each with a forward and backward kernels
    assert case["kernels"] == ["flex_bwd_dkv", "flex_bwd_dq", "flex_fwd"], case  # flex's kernels (one family)


def test_pallas_ring_block_matches_the_flash_block():
  """The ring's Pallas block (flex's kernels, interpret mode) returns the flash block's `(out, lse)`, with gradients
  through both (the lse cotangent enters the backward kernels as `delta - dlse`); a row without keys has lse =
  MASK_VALUE."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from kernels.softmax.sequence_parallel import pallas_block_fn
  from kernels.softmax.xla import flash_block

  b, c, h, d = 2, 12, 2, 8  # 12 is padded to the kernels' tile inside
  q, k, v, do = (jax.random.normal(key, (b, c, h, d)) for key in jax.random.split(jax.random.key(0), 4))
  dlse = jax.random.normal(jax.random.key(1), (b, h, c))
  mask = jnp.arange(c)[None] >= jnp.array([[3], [0]])  # row 0: the first 3 keys padded (causal: rows 0-2 see none)
  block = pallas_block_fn("tpu", interpret=True)
  for causal in (True,):  # the full (unmasked) block runs in the sharded "kernel:ring_pallas" case
    def loss(fn, q, k, v, causal=causal):
      o, lse = fn(q, k, v, key_mask=mask, causal=causal, scale=d ** -0.5)
      return jnp.sum(o * do) + jnp.sum(jnp.where(lse > -1e9, lse, 0.0) * dlse), (o, lse)
    (_, (o1, lse1)), g1 = jax.jit(jax.value_and_grad(lambda *a: loss(block, *a), argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    (_, (o0, lse0)), g0 = jax.jit(jax.value_and_grad(lambda *a: loss(flash_block, *a), argnums=(0, 1, 2),
                                                     has_aux=True))(q, k, v)
    np.testing.assert_allclose(o1, o0, atol=2e-6, err_msg=f"{causal=}")  # float32 tolerances
    np.testing.assert_allclose(lse1, lse0, atol=2e-6, err_msg=f"{causal=}")
    for a, e in zip(g1, g0):
      np.testing.assert_allclose(a, e, atol=2e-5, err_msg=f"{causal=}")


def test_halo_refusal_names_why_a_call_takes_the_fallback():
  """The halo plan, asked before any work (what the layer records as the fallback's reason): None where the halo
  serves every option of the call, else one reason naming what it cannot serve."""
  from attention import sparse_layouts
  from kernels.block_sparse.sequence_parallel import halo_refusal

  local = sparse_layouts.local_layout(8, window=3)
  longformer = sparse_layouts.longformer_layout(8, window=3, num_global_blocks=1)
  bigbird = sparse_layouts.bigbird_layout(8, window=3, num_global_blocks=1, num_random_blocks=1, num_heads=2,
                                          seed=(0, 0))
  plan = dict(length=32, block_size=4, causal=False, size=4)
  assert halo_refusal(local, **plan) is None
  assert halo_refusal(longformer, **plan) is None
  assert halo_refusal(longformer, **plan, implementation="xla") is None
  assert "not a band" in halo_refusal(bigbird, **plan)
  assert "attention dropout" in halo_refusal(local, **plan, dropout=True)
  assert "implementation='pallas'" in halo_refusal(longformer, **plan, implementation="pallas")
  assert halo_refusal(local, **plan, implementation="pallas") is None  # the band runs the kernels asked for
  assert "wider than a shard" in halo_refusal(sparse_layouts.local_layout(8, window=7), **plan)


def test_each_sharded_core_logs_its_form(results):
  """Outside a recording (the kernel-level cases call the cores directly) every core logs the form it ran once, with
  its detail; the encoder's lines (fallback included) are checked above."""
  log = results[1]
  assert "ring_attention: ring: " in log and "linear_attention: state: " in log, log[-2000:]
  assert "ring_attention: ring: the Pallas flash kernels" in log, log[-2000:]


if __name__ == "__main__":
  _run_cases()
