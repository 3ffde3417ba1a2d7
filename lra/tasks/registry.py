"""Task registry: tasks register by name, training code looks them up and never branches on a task name."""

from __future__ import annotations

from typing import Callable, TypeVar

_TASKS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
  """Class decorator registering a `Task` subclass under `name`."""

  def decorator(cls: T) -> T:
    if name in _TASKS and _TASKS[name] is not cls:
      raise ValueError(f"task {name!r} is already registered by {_TASKS[name].__qualname__}")
    _TASKS[name] = cls
    cls.name = name
    return cls

  return decorator


def names() -> tuple[str, ...]:
  """Registered task names, sorted."""
  return tuple(sorted(_TASKS))


def get(name: str) -> type:
  try:
    return _TASKS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown task {name!r}; valid choices: {', '.join(names())}") from None


def build(config):
  """The task named by `config.task`, constructed with the whole config."""
  return get(config.task)(config)
