"""Attention variants written as `flax.nnx.Module`s, registered with the same `@attention.register(name)`.

An NNX variant is constructed the NNX way, with the input width first and its options as keyword parameters:

    @attention.register("my_nnx_attention")
    class MyNNXAttention(nnx.Module):
      option_ranges = {"temperature": attention.ranges.Real(0.0, lo_open=True)}

      def __init__(self, in_features: int, *, num_heads: int = 8, qkv_dim: int | None = None, causal: bool = False,
                   dropout_rate: float = 0.0, dtype="float32", temperature: float = 1.0, rngs: nnx.Rngs): ...

      def __call__(self, x, mask=None, deterministic=True): ...

`register` keeps the NNX class unchanged and registers a linen `AttentionLayer` made from it (`linen_variant`), so
every path that builds, resolves, trains, checkpoints or tests a linen variant does the same for an NNX one:

- options: each keyword parameter with a default other than `rngs` is an option, a dataclass field of the linen
  class, so `attention.options(name)`, `option_ranges`, `resolve` and the config checks see it as a linen field;
  the common options (`num_heads`, `qkv_dim`, `causal`, `dropout_rate`, `decode`, `dtype`, `positions`) the
  constructor takes are passed to it; one it does not take may only keep its default (a ValueError otherwise: the
  layer would ignore it). Without a `causal` parameter the variant cannot be causal (`supports_causal=False`).
- class constants and questions of `AttentionLayer` (`supports_causal`, `supports_decode`, `not_causal_reason`,
  `fixed_size_cache`, `option_ranges`, `default_layer_options`, ...) are read from the NNX class where it defines them.
- state: at `init` the NNX module is constructed with `nnx.Rngs` from the linen rng streams and its variables go to
  the linen collections of their types (`nnx.Param` -> `params`, `nnx.Cache` -> `cache`, ...), flat: no extra
  level, so `query`/`key`/`value`/`out` sit where a linen variant's projections do. At `apply` the module is
  constructed again (its initializers are dead code under jit), updated from the linen variables, called, and the
  collections the caller made mutable are written back. Random streams are fresh per call, as `make_rng` is.
- decode: as in linen, a `decode=True` layer allocates its `nnx.Cache` variables on the call that finds none (the
  `init` on an input of the maximum length) and returns the parallel output; each later call with a length-1 input
  advances it. The allocated variables come back from the `cache` collection on the next call.

This follows Flax's own bridge (`flax.nnx.bridge.ToLinen`), without its extra submodule level and with the options
made visible to the registry.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import flax.linen as nn
import jax
from flax import nnx

from attention.base import AttentionLayer

# The constructor parameters the bridge supplies itself (not options).
_SUPPLIED = ("rngs",)
_VARIANTS: dict[type, type[AttentionLayer]] = {}


def _common_fields() -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(AttentionLayer) if f.init and f.name not in ("parent", "name")}


def _class_hooks() -> list[str]:
  """`AttentionLayer`'s class constants and classmethods (what a variant class answers), read from an NNX class."""
  fields = {f.name for f in dataclasses.fields(AttentionLayer)}
  hooks = []
  for klass in AttentionLayer.__mro__:
    if klass is nn.Module:
      break
    for key, value in vars(klass).items():
      if key.startswith("_") or key in fields or key in hooks:
        continue
      if isinstance(value, (classmethod, staticmethod)) or not (callable(value) or isinstance(value, property)):
        hooks.append(key)
  return hooks


def _options(nnx_cls: type, name: str) -> dict[str, inspect.Parameter]:
  """The NNX constructor's options: every parameter after the input width, except `rngs`."""
  params = list(inspect.signature(nnx_cls.__init__).parameters.values())[1:]  # without self
  if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
    raise TypeError(f"@attention.register({name!r}): {nnx_cls.__qualname__}.__init__ must take the input width "
                    f"first (`def __init__(self, in_features, *, ..., rngs)`), got {inspect.signature(nnx_cls)}")
  out = {}
  for p in params[1:]:
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _SUPPLIED:
      continue
    if p.default is p.empty:
      raise TypeError(f"@attention.register({name!r}): option {p.name!r} of {nnx_cls.__qualname__}.__init__ needs a "
                      f"default value (options are set by name and default to it)")
    out[p.name] = p
  return out


def linen_variant(nnx_cls: type, name: str) -> type[AttentionLayer]:
  """The linen `AttentionLayer` that runs `nnx_cls` (made once per class): what the registry holds for it."""
  if nnx_cls in _VARIANTS:
    return _VARIANTS[nnx_cls]
  own = _options(nnx_cls, name)
  common = _common_fields()
  taken = tuple(k for k in common if k in own)
  namespace: dict[str, Any] = {"__module__": nnx_cls.__module__, "__doc__": nnx_cls.__doc__,
                               "__qualname__": f"{nnx_cls.__qualname__}[linen]", "nnx_class": nnx_cls,
                               "nnx_common_options": taken, "nnx_registered_name": name,
                               "__annotations__": {}}
  for key in _class_hooks():
    if hasattr(nnx_cls, key):
      namespace[key] = inspect.getattr_static(nnx_cls, key) if key in vars(nnx_cls) else getattr(nnx_cls, key)
  if "causal" not in own and "supports_causal" not in vars(nnx_cls):
    namespace["supports_causal"] = False
    namespace["not_causal_reason"] = f"{nnx_cls.__qualname__}.__init__ takes no `causal` option"
  if namespace.get("supports_decode", False) and "decode" not in own:
    raise TypeError(f"@attention.register({name!r}): {nnx_cls.__qualname__} says supports_decode but its __init__ "
                    f"takes no `decode` option")
  for key, p in own.items():
    if key in common:
      continue  # the common field of AttentionLayer; the constructor's default must agree
    namespace["__annotations__"][key] = Any
    namespace[key] = p.default
  for key in taken:
    if own[key].default != common[key].default:
      raise TypeError(f"@attention.register({name!r}): {nnx_cls.__qualname__}.__init__ gives the common option "
                      f"{key!r} the default {own[key].default!r}; the registry's default is {common[key].default!r} "
                      f"(every variant shares it): use that default")
  variant = type(nnx_cls.__name__, (_NNXVariant,), namespace)
  _VARIANTS[nnx_cls] = variant
  return variant


class _NNXVariant(AttentionLayer):
  """Runs `nnx_class` as a linen layer (see the module docstring)."""

  nnx_class: ClassVar[type]
  nnx_common_options: ClassVar[tuple[str, ...]] = ()
  nnx_registered_name: ClassVar[str] = ""

  def _constructor_options(self) -> dict[str, Any]:
    common = _common_fields()
    ignored = [k for k in common if k not in self.nnx_common_options and getattr(self, k) != common[k].default]
    if ignored:
      k = ignored[0]
      raise ValueError(f"attention variant {self.nnx_registered_name!r} ({self.nnx_class.__qualname__}, an nnx.Module) "
                       f"does not take option {k}; got {k}={getattr(self, k)!r}, which it would ignore: leave "
                       f"{k} at its default {common[k].default!r} or add a `{k}` parameter to its __init__")
    own = [f.name for f in dataclasses.fields(self) if f.init and f.name not in ("parent", "name")
           and (f.name not in common or f.name in self.nnx_common_options)]
    return {k: getattr(self, k) for k in own}

  def _rngs(self) -> nnx.Rngs:
    streams = {name: self.make_rng(name) for name in self.scope.rngs}
    # Constructing at apply time needs a key for the initializers whose values the variables then replace.
    default = streams.get("params", jax.random.key(0))
    return nnx.Rngs(default, **streams)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    self.check_inputs(x, mask)
    module = self.nnx_class(x.shape[-1], **self._constructor_options(), rngs=self._rngs())
    if not self.is_initializing():
      self._restore(module)
    y = module(x, mask=mask, deterministic=deterministic)
    self._write_back(module)
    return y

  def _restore(self, module: nnx.Module) -> None:
    """The linen variables into the freshly constructed module. Those it does not have yet (a decode cache allocated
    by a call) are set as variables of their collection's type (`cache` -> `nnx.Cache`), so the module finds them."""
    present = {path for path, _ in nnx.to_flat_state(nnx.state(module))}
    for collection, tree in self.variables.items():
      flat = nnx.traversals.flatten_mapping(nn.unbox(dict(tree)))
      known = {path: value for path, value in flat.items() if path in present}
      if known:
        nnx.update(module, nnx.traversals.unflatten_mapping(known))
      variable_type = nnx.variablelib.variable_type_from_name(collection, allow_register=True)
      for path, value in flat.items():
        if path not in present:
          owner = module
          for part in path[:-1]:
            owner = owner[part] if isinstance(part, int) else getattr(owner, part)
          setattr(owner, path[-1], variable_type(value))

  def _write_back(self, module: nnx.Module) -> None:
    """The module's variables into the linen collections of their types (those the caller made mutable)."""
    by_collection: dict[str, list] = {}
    for path, leaf in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState))):
      collection = nnx.variablelib.variable_name_from_type(type(leaf), allow_register=True)
      by_collection.setdefault(collection, []).append((path, leaf.get_value()))
    for collection, flat in by_collection.items():
      if self.is_mutable_collection(collection):
        for key, value in nnx.traversals.unflatten_mapping(flat).items():
          self.put_variable(collection, key, value)
