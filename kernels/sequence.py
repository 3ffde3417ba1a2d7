"""Context parallelism: which mesh a traced call is sequence-sharded over, and the helpers every op's
sequence-parallel form shares (sharding constraints, the exact all-gather fallback, the once-per-reason log).

How a layer knows its input is sequence-sharded: the trainer traces its steps inside `use_mesh(mesh)` (a context
variable, read at trace time, so the jitted program holds the choice); `active()` returns the `SequenceMesh` when the
mesh's `"sequence"` axis has more than one device and None otherwise (one device, `init`, decoding, plain calls).
Layers call `active()` where they pick their core: a sequence-parallel form in `kernels/<op>/sequence_parallel.py`
under `jax.shard_map` over the mesh, or `fallback_gather` (K/V replicated along the sequence by a sharding
constraint: GSPMD then all-gathers them, and each device attends its own queries to every key, exactly as the
unsharded call).

Which form ran is recorded, not guessed: every sequence-parallel core calls `ran(op, form, detail)` when it is traced
(`"ring"`, `"halo"`, `"state"`, `"fallback"`), so `recording()` tells a caller (the encoder's one log line per layer,
the tests' assertions) exactly what a sharded call ran; outside a recording the core logs its form once itself.

Everything outside the shard_map'd cores stays under GSPMD (`jax.jit` with `NamedSharding`), whose partitioning keeps
the program's semantics: pooling, losses and layer norms reduce across the sequence shards exactly (up to float
summation order).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from typing import Iterator

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
SEQUENCE_AXIS = "sequence"

logger = logging.getLogger("kernels")
_logged: set[tuple[str, str]] = set()
_active: contextvars.ContextVar["SequenceMesh | None"] = contextvars.ContextVar("sequence_mesh", default=None)
_recorder: contextvars.ContextVar["list[Ran] | None"] = contextvars.ContextVar("sequence_recorder", default=None)
# The forms a core records (`Ran.form`); layers whose only work is partitioned by GSPMD declare theirs instead
# (`AttentionLayer.sequence_parallel_form`: "psum", "halo", "gspmd").
FORMS = ("ring", "halo", "state", "fallback")


@dataclasses.dataclass(frozen=True)
class SequenceMesh:
  """The mesh a call is sharded over: batch along `data_axis`, length along `axis` (`size` devices)."""

  mesh: Mesh
  axis: str = SEQUENCE_AXIS
  data_axis: str = DATA_AXIS

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis]

  def batch_axis(self, batch: int) -> str | None:
    """The data axis when it divides `batch` (else the batch is replicated: e.g. a batch of 1 at tracing tests)."""
    n = self.mesh.shape.get(self.data_axis, 1)
    return self.data_axis if n > 1 and batch % n == 0 else None

  def spec(self, batch: int, ndim: int, *, sharded: bool = True) -> P:
    """`[B, L, ...]` -> P(data, sequence, None, ...); `sharded=False` replicates the length."""
    return P(self.batch_axis(batch), self.axis if sharded else None, *([None] * (ndim - 2)))

  def check_length(self, length: int, what: str) -> None:
    if length % self.size:
      raise ValueError(f"{what}: length {length} must be a multiple of mesh.sequence={self.size}; pad the inputs "
                       f"to a multiple of {self.size} (the encoder does) or change config.mesh.sequence")


def active() -> SequenceMesh | None:
  """The sequence mesh of the call being traced, or None when the length is not sharded."""
  ctx = _active.get()
  return ctx if ctx is not None and ctx.size > 1 else None


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[SequenceMesh | None]:
  """Traces inside this block see `mesh` as the sequence mesh (a mesh without a "sequence" axis: none)."""
  ctx = SequenceMesh(mesh) if mesh is not None and SEQUENCE_AXIS in mesh.shape else None
  token = _active.set(ctx)
  try:
    yield active()
  finally:
    _active.reset(token)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
  """No sequence mesh inside (a core called from inside a shard_map body must not shard again)."""
  token = _active.set(None)
  try:
    yield
  finally:
    _active.reset(token)


@dataclasses.dataclass(frozen=True)
class Ran:
  """One sequence-parallel form a traced call ran: `form` (one of `FORMS`; None for a note) by `op`, and why."""

  op: str
  form: str | None
  detail: str


@contextlib.contextmanager
def recording() -> Iterator[list[Ran]]:
  """Collects the `Ran` records of the calls traced inside (nothing is logged meanwhile: the caller reports them).
  A recording inside another passes its records on to the outer one when it ends."""
  records: list[Ran] = []
  token = _recorder.set(records)
  try:
    yield records
  finally:
    _recorder.reset(token)
    outer = _recorder.get()
    if outer is not None:
      outer.extend(records)


def ran(op: str, form: str, detail: str) -> None:
  """Records that `op` runs the sequence-parallel `form` (see `FORMS`) for the call being traced, with `detail` (the
  reason or the module that does it); logged once when no `recording()` is active."""
  if form not in FORMS:
    raise ValueError(f"unknown sequence-parallel form {form!r}; valid choices: {FORMS}")
  records = _recorder.get()
  if records is not None:
    records.append(Ran(op, form, detail))
  else:
    log_once(op, f"{form}: {detail}")


def log_once(op: str, reason: str) -> None:
  """Logs `op`'s choice of form once per (op, reason); inside a `recording()` it is kept there as a note instead."""
  records = _recorder.get()
  if records is not None:
    records.append(Ran(op, None, reason))
    return
  if (op, reason) not in _logged:
    _logged.add((op, reason))
    logger.warning("sequence parallel: %s: %s", op, reason)


def constrain(x: jax.Array, *, sharded: bool = True) -> jax.Array:
  """`x [B, L, ...]` constrained to be length-sharded (or, `sharded=False`, replicated along the sequence)."""
  ctx = active()
  if ctx is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, ctx.spec(x.shape[0], x.ndim, sharded=sharded)))


FALLBACK = (f"the exact fallback (K/V all-gathered along '{SEQUENCE_AXIS}'; the rest of the layer as GSPMD "
            f"partitions it)")
NO_FORM = "no sequence-parallel form for these options"


def log_fallback(op: str, reason: str = NO_FORM) -> None:
  """Records (or logs once) that `op` takes the exact fallback, and why."""
  ran(op, "fallback", f"{reason}: {FALLBACK}")


def fallback_gather(x: jax.Array, op: str, reason: str = NO_FORM) -> jax.Array:
  """The exact fallback for a core without a sequence-parallel form: `x` (keys, values) replicated along the
  sequence, so GSPMD all-gathers it and each device attends its own queries to every key. Recorded (`ran`) with
  `reason`."""
  if active() is None:
    return x
  log_fallback(op, reason)
  return constrain(x, sharded=False)


def shard_map(f, ctx: SequenceMesh, in_specs, out_specs):
  """`jax.shard_map` over the sequence mesh; the body runs with the sequence mesh suspended."""
  def body(*args):
    with suspended():
      return f(*args)
  return jax.shard_map(body, mesh=ctx.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


__all__ = ["DATA_AXIS", "FORMS", "Ran", "SEQUENCE_AXIS", "SequenceMesh", "active", "constrain", "fallback_gather",
           "log_fallback", "log_once", "ran", "recording", "shard_map", "suspended", "use_mesh"]
