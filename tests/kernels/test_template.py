"""Every op folder in `kernels/` follows the one template (issue 23; `kernels.common.OP_FILES`, docs/architecture.md
"Functional cores"): the same file roles, `IMPLEMENTATIONS` drawn from one vocabulary and matching the files present,
no import between the two backends' modules, one `Backend`, one masked-logit constant, op names in one form, and
one key-padding argument `key_mask` (bool [batch, keys], True = a real key) that every entry honours.

The structure is read with `ast` (nothing imported for it); the key-mask convention is checked by running every
implementation each op has on CPU at tiny shapes.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.common import IMPLEMENTATION_VOCABULARY, KEY_MASK, OP_FILES, REQUIRED_OP_FILES

ROOT = pathlib.Path(kernels.__file__).parent
REPO = ROOT.parent
# Folders being rewritten in parallel, checked once merged: delete the entry then (the test fails for a folder that
# no longer needs it).
PENDING: dict[str, str] = {}  # op -> why it is not on the template yet (none now)
OPS = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__")
CHECKED = [op for op in OPS if op not in PENDING]
BACKENDS = ("pallas_tpu", "pallas_gpu")


def _tree(path: pathlib.Path) -> ast.Module:
  return ast.parse(path.read_text(), filename=str(path))


def _module_constant(tree: ast.Module, name: str):
  for node in tree.body:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
      return ast.literal_eval(node.value)
  raise AssertionError(f"no module-level {name} = <literal>")


def _is_reexport_shim(tree: ast.Module) -> bool:
  """A module of imports and name aliases only (kept importable for a caller being rewritten), saying so."""
  doc = ast.get_docstring(tree) or ""
  body = tree.body[1:] if doc else tree.body
  simple = all(isinstance(n, (ast.Import, ast.ImportFrom)) or
               (isinstance(n, ast.Assign) and isinstance(n.value, (ast.Name, ast.List, ast.Tuple))) for n in body)
  return simple and "shim" in doc.lower()


def _imported_modules(tree: ast.Module) -> set[str]:
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names |= {f"{node.module}.{a.name}" for a in node.names}
  return names


def test_pending_folders_still_exist():
  assert set(PENDING) <= set(OPS), f"stale PENDING entries: {set(PENDING) - set(OPS)}"


@pytest.mark.parametrize("op", CHECKED)
def test_op_folder_has_the_template_files(op):
  folder = ROOT / op
  files = {p.name for p in folder.iterdir() if p.is_file() and p.suffix == ".py"}
  assert set(REQUIRED_OP_FILES) <= files, f"kernels/{op} lacks {set(REQUIRED_OP_FILES) - files}"
  extra = {f for f in files - set(OP_FILES) if not _is_reexport_shim(_tree(folder / f))}
  assert not extra, f"kernels/{op}: files outside the template roles {sorted(OP_FILES)}: {sorted(extra)}"
  has_backend = bool(files & {f"{b}.py" for b in BACKENDS})
  if has_backend:
    assert "pallas.py" in files, f"kernels/{op}: backend modules need the driver pallas.py"
  elif "pallas.py" in files:
    # A driver without backend modules of its own runs another op's kernels (softmax: the block-sparse flash
    # kernels with a full or causal layout); it must say which by importing that op.
    reused = {n.split(".")[1] for n in _imported_modules(_tree(ROOT / op / "pallas.py"))
              if n.startswith("kernels.") and n.count(".") >= 1 and n.split(".")[1] in OPS and n.split(".")[1] != op}
    assert reused, f"kernels/{op}: pallas.py without pallas_tpu.py / pallas_gpu.py must drive another op's kernels"


@pytest.mark.parametrize("op", CHECKED)
def test_implementations_use_the_one_vocabulary_and_match_the_files(op):
  tree = _tree(ROOT / op / "__init__.py")
  implementations = _module_constant(tree, "IMPLEMENTATIONS")
  assert isinstance(implementations, tuple) and set(implementations) <= set(IMPLEMENTATION_VOCABULARY), implementations
  assert "reference" in implementations and None in implementations
  files = {p.name for p in (ROOT / op).iterdir()}
  assert ("xla" in implementations) == ("xla.py" in files), (op, implementations)
  for kernel_name in ("pallas", "interpret"):
    assert (kernel_name in implementations) == ("pallas.py" in files), (op, implementations)
  op_name = _module_constant(tree, "OP")
  assert "." not in op_name and op_name == _entry_name(op), f"kernels/{op}: OP={op_name!r} must name its entry"
  assert op_name in _module_constant(tree, "__all__")


def _entry_name(op: str) -> str:
  return _module_constant(_tree(ROOT / op / "__init__.py"), "OP")


@pytest.mark.parametrize("op", CHECKED)
def test_the_two_backends_never_import_each_other_or_the_driver(op):
  for backend in BACKENDS:
    path = ROOT / op / f"{backend}.py"
    if not path.exists():
      continue
    imported = _imported_modules(_tree(path))
    forbidden = {f"kernels.{op}.{other}" for other in (*BACKENDS, "pallas") if other != backend}
    assert not imported & forbidden, f"kernels/{op}/{backend}.py imports {imported & forbidden}"


def _python_files(*folders: str) -> list[pathlib.Path]:
  out = []
  for folder in folders:
    out += [p for p in (REPO / folder).rglob("*.py") if not any(part in PENDING for part in p.relative_to(REPO).parts)
            or folder != "kernels"]
  return sorted(out)


def test_backend_is_defined_once():
  definers = []
  for path in _python_files("kernels"):
    for node in _tree(path).body:
      targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
      if isinstance(node, ast.ClassDef) and node.name == "Backend" or any(
          isinstance(t, ast.Name) and t.id == "Backend" for t in targets):
        definers.append(str(path.relative_to(REPO)))
  assert definers == ["kernels/platform.py"], definers


def _masked_logit_literals(tree: ast.Module) -> list[int]:
  """Lines of hand-written masked-logit floors: a literal <= -1e8 or `finfo(...).min`."""
  lines = []
  for node in ast.walk(tree):
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
        and isinstance(node.operand.value, (int, float)) and node.operand.value >= 1e8:
      lines.append(node.lineno)
    if isinstance(node, ast.Attribute) and node.attr == "min" and isinstance(node.value, ast.Call) \
        and getattr(node.value.func, "attr", getattr(node.value.func, "id", None)) == "finfo":
      lines.append(node.lineno)
  return lines


def test_one_masked_logit_constant():
  """`kernels.common.MASK_VALUE` is the only masked-logit floor in kernels/ and attention/."""
  found = {}
  for path in _python_files("kernels", "attention"):
    lines = _masked_logit_literals(_tree(path))
    if lines and path != ROOT / "common.py":
      found[str(path.relative_to(REPO))] = lines
  assert not found, f"use kernels.common.MASK_VALUE instead of: {found}"


# ----------------------------------------------------------------------------------------------------------------------
# The key-padding convention, run: every op's entry takes `key_mask` (bool [batch, keys], True = a real key), and
# changing the content of masked keys never changes the output, in every implementation the op runs on CPU.

B, L, H, D = 2, 16, 2, 8
LAYOUT = np.tril(np.ones((1, 2, 2), bool)) | np.eye(2, dtype=bool)[None]


def _attention_call(op: str):
  """The op's entry as `f(q, k, v, key_mask, implementation)` at tiny shapes."""
  entry = getattr(importlib.import_module(f"kernels.{op}"), _entry_name(op))
  calls = {
      "softmax": lambda q, k, v, m, impl: entry(q, k, v, key_mask=m, implementation=impl),
      "block_sparse": lambda q, k, v, m, impl: entry(q, k, v, LAYOUT, block_size=8, key_mask=m, implementation=impl),
      "flex": lambda q, k, v, m, impl: entry(q, k, v, mask_mod=lambda b, h, i, j: j <= i, block_size=8, key_mask=m,
                                             implementation=impl),
      "linear_attention": lambda q, k, v, m, impl: entry(jax.nn.elu(q) + 1, jax.nn.elu(k) + 1, v, causal=False,
                                                         chunk_size=8, key_mask=m, implementation=impl),
      "sliding_window": lambda q, k, v, m, impl: entry(q, k, v, window=4, causal=False, key_mask=m,
                                                       implementation=impl),
      "block_diagonal": lambda q, k, v, m, impl: entry(q, k, v, block_size=8, causal=False, key_mask=m,
                                                       implementation=impl),
      # Sinkhorn balances a [batch, rows, cols] score matrix: the keys are its columns, the values are unused.
      "sinkhorn": lambda q, k, v, m, impl: entry(jnp.einsum("bqd,bkd->bqk", q[:, :, 0], k[:, :, 0]), 3,
                                                 key_mask=m, implementation=impl),
      # The gated / delta-rule cores are causal recurrences with a fixed decay per head (the TPU kernel's chunk: 8).
      "gated_linear": lambda q, k, v, m, impl: entry(q, k, v, jnp.full(q.shape[:3], -0.1), chunk_size=8, key_mask=m,
                                                     implementation=impl),
      "delta_rule": lambda q, k, v, m, impl: entry(q / jnp.linalg.norm(q, axis=-1, keepdims=True),
                                                   k / jnp.linalg.norm(k, axis=-1, keepdims=True), v,
                                                   jnp.full(q.shape[:3], 0.5), jnp.full(q.shape[:3], -0.1),
                                                   chunk_size=8, key_mask=m, implementation=impl),
  }
  return entry, calls[op]


def test_every_op_has_a_key_mask_case():
  assert set(CHECKED) == {"softmax", "block_sparse", "flex", "linear_attention", "sliding_window", "block_diagonal",
                          "sinkhorn",
                          "gated_linear", "delta_rule"}, \
      "a new op folder: add its call to _attention_call"


@pytest.mark.parametrize("op", CHECKED)
def test_every_entry_takes_key_mask_and_implementation(op):
  entry, _ = _attention_call(op)
  params = inspect.signature(entry).parameters
  for name in (KEY_MASK, "implementation"):
    assert name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None, \
        f"{op}: {entry.__name__} must take keyword {name}=None"
  assert not {"kv_mask", "key_mask_BxL", "mask_BxL"} & set(params), f"{op}: one key-padding name only"


@functools.lru_cache(maxsize=None)
def _loss_value_and_grad(op: str):
  """jit of `(sum(out ** 2), out), grads` for the op's call, `implementation` static: the key-mask tests share its
  compiled programs (one per implementation; the key mask is an argument) instead of compiling a forward too."""
  call = _attention_call(op)[1]

  def loss(q, k, v, key_mask, impl):
    out = call(q, k, v, key_mask, impl)
    return jnp.sum(out ** 2), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=4)


def _output(op: str, impl: str, *args):
  """The op's output: from the shared loss-and-gradient program where the gradient test compiles one (reference,
  xla), from a forward jit otherwise (the kernels in interpret mode, the reference without a mask)."""
  if impl in ("reference", "xla") and args[3] is not None:
    return _loss_value_and_grad(op)(*args, impl)[0][1]
  return _forward(op)(*args, impl)


@functools.lru_cache(maxsize=None)
def _forward(op: str):
  return jax.jit(_attention_call(op)[1], static_argnums=4)


@pytest.mark.parametrize("op", CHECKED)
def test_masked_keys_never_change_the_output(op):
  call = functools.partial(_output, op)  # one compilation per implementation and mask form, shared with the next test
  implementations = [i for i in _module_constant(_tree(ROOT / op / "__init__.py"), "IMPLEMENTATIONS") if i != "pallas"]
  kq, kk, kv, kn = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (B, L, H, D)) for key in (kq, kk, kv))
  key_mask = jnp.arange(L)[None, :] < jnp.array([[L - 5], [L]])  # row 0: the last 5 keys are padding
  noise = 3.0 * jax.random.normal(kn, (B, L, H, D)) * (~key_mask)[:, :, None, None]
  want = call("reference", q, k, v, key_mask)
  for impl in implementations:
    masked = call(impl, q, k, v, key_mask)
    perturbed = call(impl, q, k + noise, v + noise, key_mask)
    np.testing.assert_allclose(masked, want, rtol=2e-5, atol=2e-5, err_msg=f"{op} {impl}")
    np.testing.assert_allclose(perturbed, masked, rtol=2e-5, atol=2e-5, err_msg=f"{op} {impl}")
  # The mask does something: without it the perturbed keys change the output.
  unmasked = call("reference", q, k + noise, v + noise, None)
  assert not np.allclose(unmasked, call("reference", q, k, v, None), atol=1e-3)
  with pytest.raises(ValueError, match=rf"unknown {_entry_name(op)} implementation 'bogus'"):
    _attention_call(op)[1](q, k, v, key_mask, "bogus")


@pytest.mark.parametrize("op", CHECKED)
def test_a_row_without_real_keys_gives_zeros_and_finite_gradients(op):
  """MASK_VALUE is safe where it meets sums and exponentials: a batch row whose keys are all padding outputs zeros
  (no NaN, no uniform average over padding) with finite gradients, in the reference and the XLA form."""
  q, k, v = (jax.random.normal(key, (B, L, H, D)) for key in jax.random.split(jax.random.key(1), 3))
  key_mask = jnp.array([[False] * L, [True] * L])
  implementations = _module_constant(_tree(ROOT / op / "__init__.py"), "IMPLEMENTATIONS")
  for impl in [i for i in ("reference", "xla") if i in implementations]:
    (_, out), grads = _loss_value_and_grad(op)(q, k, v, key_mask, impl)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0, err_msg=f"{op} {impl}")
    assert np.all(np.isfinite(np.asarray(out[1]))) and np.any(np.asarray(out[1]) != 0)
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g))), f"{op} {impl}: non-finite gradient"
