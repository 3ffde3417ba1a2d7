"""Where a kernel runs: backend names, kernel choice at lowering time, and the fallback log, defined once for all ops.

`implementation=None` must pick the kernel of the platform the program is *lowered* for, not of the host that traces
it, so that a step exported or AOT-compiled for an accelerator from a CPU host holds the kernels. `dispatch` stages
every candidate with `jax.lax.platform_dependent` (all branches are traced; only the branch of the lowering platform
is lowered, so a CPU program never contains a Pallas custom call and a `cuda`/`tpu` export contains nothing else).

Fallback log, decided here: a reason why a kernel cannot serve a call is recorded in its platform's branch by an
identity primitive whose *lowering* (or eager execution) logs it, once per (op, platform, reason). Tracing on a CPU
host for CPU therefore prints nothing about GPU or TPU constraints; exporting for `cuda` prints the `cuda` reasons only.
An explicit `implementation="pallas"` uses `require_kernel`: the same staging without a fallback, where a reason is
an error raised when the program is lowered for that platform (or the CPU default, which has no kernel).

Staging every platform costs tracing time: each kernel-backed op traces its TPU and Mosaic GPU kernels, forward and
backward, even in a program that only ever runs on this CPU (a small sharded training step: ~4 s of XLA tracing
becomes ~15 s). `staging("local")` (or `EA_KERNEL_STAGING=local` in the environment) stages only the XLA form for
programs traced on a CPU-only host outside `jax.export`; exports still stage every platform (detected while
tracing). The default is "all". Use "local" only where nothing traced under it is exported later: jax caches a jitted
function's trace, so exporting a function that was first called under "local" reuses its CPU-only trace (the test
suite uses it for its CPU-only value checks; the kernels' own tests and every export run under "all").
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import sys
from typing import Callable, Iterator, Literal, Mapping, TypeVar

import jax
from jax.extend.core import Effect, Primitive
from jax.interpreters import mlir

Backend = Literal["tpu", "gpu"]
T = TypeVar("T")

logger = logging.getLogger("kernels")
_logged: set[tuple[str, str, str]] = set()

# Lowering platforms that run each kernel backend. Mosaic GPU (plgpu) targets NVIDIA Hopper only: rocm, a "gpu"
# platform too, gets xla with a logged reason (an error for an explicit implementation="pallas").
KERNEL_PLATFORMS: dict[Backend, tuple[str, ...]] = {"tpu": ("tpu",), "gpu": ("cuda",)}
_UNSERVED_PLATFORMS: dict[Backend, dict[str, str]] = {
    "gpu": {"rocm": "the Mosaic GPU kernels target NVIDIA GPUs (cuda) only"}}


def accelerator_of(platform: str) -> Backend | None:
  """The kernel backend family of a JAX platform name: "tpu" -> "tpu"; "cuda", "rocm", "gpu" -> "gpu"; else None."""
  platform = platform.lower()
  if platform == "tpu":
    return "tpu"
  if platform in ("cuda", "rocm", "gpu"):
    return "gpu"
  return None


def default_accelerator() -> Backend | None:
  """The kernel backend of `jax.default_backend()`: only for eager/host-side decisions, never for kernel choice in
  traced code (use `dispatch`, which decides where the program is lowered)."""
  return accelerator_of(jax.default_backend())


MOSAIC_GPU_DTYPES = ("bfloat16", "float16")


def mosaic_gpu_dtype_reason(dtype) -> str | None:
  """Why a Mosaic GPU (wgmma) kernel cannot take `dtype`, or None when it can."""
  name = jax.numpy.dtype(dtype).name
  if name in MOSAIC_GPU_DTYPES:
    return None
  return (f"dtype={name}: the Mosaic GPU kernels take only bfloat16/float16 (wgmma operands); set "
          f"config.model.dtype='bfloat16' (or pass bfloat16 inputs), or use implementation='xla'")


def log_fallback_once(op: str, platform: str, reason: str, fallback: str = "xla") -> None:
  """One WARNING line per (op, platform, reason): `<op>: Pallas kernel cannot serve this call on <platform>
  (<reason>); using <fallback>`."""
  key = (op, platform, reason)
  if key in _logged:
    return
  _logged.add(key)
  logger.warning("%s: Pallas kernel cannot serve this call on %s (%s); using %s", op, platform, reason, fallback)


class KernelUnavailableError(ValueError):
  """An explicit `implementation="pallas"` lowered for a platform whose kernel cannot serve the call."""


# ----------------------------------------------------------------------------------------------------------------------
# The note primitive: no inputs, no outputs, an (unordered) effect so that dead-code elimination keeps it in its
# branch whatever the caller differentiates; its lowering (or eager run) logs a fallback or raises a kernel error.

# jax versions whose private effect registries this module was checked against (tests/kernels/test_platform.py).
PRIVATE_EFFECT_REGISTRIES_CHECKED = ((0, 10), (0, 11))
# The registries an effect must join to pass through control flow, custom_vjp and remat. jax has no public name for
# them (only `jax.interpreters.mlir.lowerable_effects` is public): this is the one private use, kept here.
_PRIVATE_EFFECT_REGISTRIES = ("control_flow_allowed_effects", "custom_derivatives_allowed_effects",
                              "remat_allowed_effects")


def _private_effect_registries(module_name: str = "jax._src.effects",
                               names: tuple[str, ...] = _PRIVATE_EFFECT_REGISTRIES) -> list:
  """The effect-type registries `names`; ImportError naming the jax version if one moved."""
  effects = importlib.import_module(module_name)
  missing = [n for n in names if not hasattr(getattr(effects, n, None), "add_type")]
  if missing:
    checked = ", ".join(f"{a}.{b}" for a, b in PRIVATE_EFFECT_REGISTRIES_CHECKED)
    raise ImportError(f"kernels.platform: jax {jax.__version__} has no {module_name}.{missing[0]} (checked with jax "
                      f"{checked}); install a checked jax version or update kernels/platform.py for this one")
  return [getattr(effects, n) for n in names]


class _KernelNoteEffect(Effect):
  __str__ = lambda self: "KernelNote"  # noqa: E731


_NOTE_EFFECT = _KernelNoteEffect()
# `lowerable_effects` has a public name (jax.interpreters.mlir) in the checked versions; the private one if it loses it.
_LOWERABLE = getattr(mlir, "lowerable_effects", None)
for _allowed in ((_LOWERABLE,) if _LOWERABLE is not None else ()) + tuple(_private_effect_registries(
    names=_PRIVATE_EFFECT_REGISTRIES + (() if _LOWERABLE is not None else ("lowerable_effects",)))):
  _allowed.add_type(_KernelNoteEffect)

_note_p = Primitive("kernel_fallback_note")
_note_p.multiple_results = True


def _note_act(op: str, platform: str, reason: str, fallback: str | None) -> None:
  if fallback is None:
    raise KernelUnavailableError(f"{op}: implementation='pallas' cannot run on {platform}: {reason}")
  log_fallback_once(op, platform, reason, fallback)


def _note_impl(*, op, platform, reason, fallback):
  _note_act(op, platform or jax.default_backend(), reason, fallback)
  return []


def _note_lowering(ctx, *, op, platform, reason, fallback):
  # platform None: the default branch, lowered for whichever platforms have no branch of their own.
  _note_act(op, platform or ",".join(ctx.module_context.platforms), reason, fallback)
  return []


_note_p.def_impl(_note_impl)
_note_p.def_effectful_abstract_eval(lambda **_: ([], {_NOTE_EFFECT}))
mlir.register_lowering(_note_p, _note_lowering)


def _noted(fn: Callable[[], T], op: str, platform: str | None, reason: str, fallback: str | None) -> Callable[[], T]:
  """`fn` preceded by the note, so the note is lowered exactly where the branch is."""

  def branch():
    _note_p.bind(op=op, platform=platform, reason=reason, fallback=fallback)
    return fn()

  return branch


def _staged(branches: dict[str, Callable[[], T]], default: Callable[[], T]) -> T:
  def no_args(fn):
    return lambda: fn()  # platform_dependent joins branches that compare equal; keep each one distinct

  return jax.lax.platform_dependent(default=no_args(default), **{p: no_args(f) for p, f in branches.items()})


STAGING_MODES = ("all", "local")
_staging: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernel_staging", default=None)


@contextlib.contextmanager
def staging(mode: str) -> Iterator[None]:
  """Within the block, `dispatch` stages every platform's kernels ("all") or, on a CPU-only host outside
  `jax.export`, only the XLA form ("local"); overrides `EA_KERNEL_STAGING` (module docstring: when it is safe)."""
  if mode not in STAGING_MODES:
    raise ValueError(f"kernel staging {mode!r}: expected one of {STAGING_MODES}")
  token = _staging.set(mode)
  try:
    yield
  finally:
    _staging.reset(token)


def staging_mode() -> str:
  """The staging mode in force: the innermost `staging(...)` block, else `EA_KERNEL_STAGING`, else "all"."""
  mode = _staging.get() or os.environ.get("EA_KERNEL_STAGING") or "all"
  if mode not in STAGING_MODES:
    raise ValueError(f"EA_KERNEL_STAGING={mode!r}: expected one of {STAGING_MODES}; unset it for the default 'all'")
  return mode


def _under_export() -> bool:
  """Whether the current trace runs inside `jax.export` (whose lowering platforms may be any): a frame of jax's export
  module is on the Python stack (the public API gives a trace no way to know its lowering platforms)."""
  frame = sys._getframe(1)
  while frame is not None:
    if frame.f_globals.get("__name__", "").startswith("jax._src.export"):
      return True
    frame = frame.f_back
  return False


def staging_key() -> str:
  """What `dispatch` stages here and now: "local" (the XLA form only) or "all". A function jitted at module level
  that calls `dispatch` takes it as a static argument, so that jax's trace cache never hands a trace staged for this
  CPU to an export (or the other way round)."""
  local = staging_mode() == "local" and jax.default_backend() == "cpu" and not _under_export()
  return "local" if local else "all"


def _local_only(op: str) -> bool:
  if staging_key() != "local":
    return False
  key = ("staging", "local", "")
  if key not in _logged:  # said once per process: the kernels are not traced at all in this mode
    _logged.add(key)
    logger.info("%s and every kernel-backed op: kernel staging 'local' (EA_KERNEL_STAGING / kernels.platform.staging): "
                "programs traced on this CPU host outside jax.export stage only their XLA forms", op)
  return True


def dispatch(op: str, *, xla: Callable[[], T], kernels: Mapping[Backend, Callable[[], T] | str]) -> T:
  """The result of the best implementation for the platform the program is lowered for (`implementation=None`).

  `kernels[backend]` is a thunk running that backend's kernel, or a string: the reason it cannot serve this call
  there (logged once when lowered for that platform, and `xla` runs instead; so does rocm for a "gpu" kernel, with
  its reason). Platforms without any kernel (CPU) run `xla` silently: XLA is their best implementation. Under
  `staging("local")` on a CPU-only host, outside `jax.export`, only `xla` is traced.
  """
  if _local_only(op):
    return xla()
  branches: dict[str, Callable[[], T]] = {}
  for backend, kernel in kernels.items():
    if backend not in KERNEL_PLATFORMS:
      raise ValueError(f"unknown kernel backend {backend!r} for {op}; valid: {tuple(KERNEL_PLATFORMS)}")
    for platform in KERNEL_PLATFORMS[backend]:
      branches[platform] = _noted(xla, op, platform, kernel, "xla") if isinstance(kernel, str) else kernel
    for platform, reason in _UNSERVED_PLATFORMS.get(backend, {}).items():
      branches[platform] = _noted(xla, op, platform, reason, "xla")
  if not branches:
    return xla()
  return _staged(branches, xla)


def require_kernel(op: str, *, kernels: Mapping[Backend, Callable[[], T] | str]) -> T:
  """Like `dispatch` for an explicit `implementation="pallas"`: never falls back. A string reason, or a platform
  without a kernel (CPU), raises `KernelUnavailableError` when the program is lowered (or run) there."""
  branches: dict[str, Callable[[], T]] = {}
  template: Callable[[], T] | None = None
  for backend, kernel in kernels.items():
    if backend not in KERNEL_PLATFORMS:
      raise ValueError(f"unknown kernel backend {backend!r} for {op}; valid: {tuple(KERNEL_PLATFORMS)}")
    if not isinstance(kernel, str):
      template = template or kernel
  if template is None:  # no backend can serve the call: nothing to stage, say why for each right away
    reasons = "; ".join(f"{b}: {r}" for b, r in kernels.items())
    raise KernelUnavailableError(f"{op}: implementation='pallas' has no kernel for this call ({reasons})")
  # A failing platform's branch must trace to the kernel's types without lowering any kernel: zeros whose note raises.
  shapes = jax.eval_shape(template)
  placeholder = lambda: jax.tree_util.tree_map(lambda s: jax.numpy.zeros(s.shape, s.dtype), shapes)  # noqa: E731
  for backend, kernel in kernels.items():
    for platform in KERNEL_PLATFORMS[backend]:
      branches[platform] = _noted(placeholder, op, platform, kernel, None) if isinstance(kernel, str) else kernel
    for platform, reason in _UNSERVED_PLATFORMS.get(backend, {}).items():
      branches[platform] = _noted(placeholder, op, platform, reason, None)
  no_kernel = ("no Pallas kernel for this platform (kernels run on TPU and on NVIDIA GPUs via cuda); use "
               "implementation='interpret' to run the kernels on CPU, or 'xla'")
  return _staged(branches, _noted(placeholder, op, None, no_kernel, None))


__all__ = ["Backend", "KERNEL_PLATFORMS", "KernelUnavailableError", "MOSAIC_GPU_DTYPES", "STAGING_MODES",
           "accelerator_of", "default_accelerator", "dispatch", "log_fallback_once", "mosaic_gpu_dtype_reason",
           "require_kernel", "staging", "staging_key", "staging_mode"]
