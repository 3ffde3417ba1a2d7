"""Mosaic GPU (Hopper, `plgpu`) building blocks shared by the GPU kernels of every op (`kernels/<op>/pallas_gpu.py`).

The kernels are written so that the GPU interpreter (`InterpretGPUParams`) can also run them on CPU: wgmma operands
always come from shared memory refs without transposed views (callers pass transposed copies from XLA where a
matmul needs one), and a register value feeding a matmul is stored to shared memory first.
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu



class Layouts:
  """Register layouts the kernels pin. The GPU interpreter has no rule for `layout_cast` (layouts mean nothing on
  CPU), so an interpreted kernel is traced with `Layouts(interpreting=True)`, whose layouts are all None."""

  def __init__(self, interpreting: bool):
    none = interpreting
    self.WGMMA = None if none else plgpu.Layout.WGMMA
    self.ROW = None if none else plgpu.Layout.WGMMA.reduce(1)  # per-row vector of a wgmma result (broadcast dims [0])
    self.COL = None if none else plgpu.Layout.WGMMA.reduce(0)  # per-column vector (broadcast dims [1])


def interpret_params():
  """GPU interpret mode (CPU simulation of SMEM, TMA, barriers and wgmma)."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415 (no public alias yet)
  return InterpretGPUParams()


def smem(shape: tuple[int, ...], dtype) -> plgpu.SMEM:
  """A shared-memory tile laid out for wgmma (8-row tiles of one swizzle span, swizzled); 1-D and float32
  statistics get a plain buffer."""
  itemsize = jnp.dtype(dtype).itemsize
  if len(shape) == 1 or itemsize == 4:
    return plgpu.SMEM(shape, dtype)
  swizzle = min(128, shape[-1] * itemsize)
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                              plgpu.SwizzleTransform(swizzle)))


def mma(a_ref, b_ref, shape: tuple[int, int]) -> jax.Array:
  """`a @ b` of two shared-memory tiles by wgmma, returned as a float32 register array (wgmma layout)."""

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a_ref, b_ref)
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


# jax 0.10's `plgpu.load(ref, idx, ...)` requires the index; jax 0.11 deprecates it (the ref is indexed instead).
_LOAD_TAKES_INDEX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def load(ref, layout) -> jax.Array:
  """The whole of `ref` in registers with `layout` (a plain read when interpreting: the interpreter has no rule for
  `plgpu.load`)."""
  if layout is None:
    return ref[...]
  return plgpu.load(ref, (), layout=layout) if _LOAD_TAKES_INDEX else plgpu.load(ref, layout=layout)


def full(shape, value: float, layout) -> jax.Array:
  """A float32 constant in registers with `layout`."""
  x = jnp.full(shape, value, jnp.float32)
  return x if layout is None else plgpu.layout_cast(x, layout)


def stage(ref, value: jax.Array) -> None:
  """Stores a register value to shared memory and makes it visible to wgmma/TMA (fence + warpgroup barrier)."""
  ref[...] = value.astype(ref.dtype)
  plgpu.commit_smem()


def stream(count, fetch: Callable, body: Callable, carry, barriers):
  """Runs `body(step, slot, carry) -> carry` for `step in [0, count)` over double-buffered TMA copies.

  `fetch(step, slot)` issues the copies of `step` into buffer `slot` (0 or 1), one per barrier array in `barriers`
  (each `Barrier(num_barriers=2)`). The copies of step + 1 are issued before step runs, after a warpgroup barrier:
  their buffer was last read by step - 1, whose wgmma results every warp has read by then.
  """

  @pl.when(count > 0)
  def _first():
    fetch(0, 0)

  def loop(step, carry):
    slot = lax.rem(step, 2)
    # The warps of the warpgroup are not in lockstep: make sure all of them are done with step - 1's reads of the
    # buffer about to be refilled (a fence + warpgroup barrier).
    plgpu.commit_smem()

    @pl.when(step + 1 < count)
    def _next():
      fetch(step + 1, 1 - slot)

    for barrier in barriers:
      plgpu.barrier_wait(barrier.at[slot])
    return body(step, slot, carry)

  return lax.fori_loop(0, count, loop, carry)
