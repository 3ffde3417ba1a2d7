"""Task registry: tasks register by name, training code looks them up and never branches on a task name.

A task defined outside the package joins through the `TASK_PLUGINS` environment variable (comma-separated module
names, as `ATTENTION_PLUGINS` for attention variants): `lra.tasks` imports each module once, when it is itself
imported, so `train.py`, `eval.py` (which rebuilds a run from its `config.json`), the scripts and the processes a
sweep starts all know the task.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from attention import plugins

_TASKS: dict[str, type] = {}
PLUGINS_ENV = "TASK_PLUGINS"

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
    raise ValueError(f"unknown task {name!r}; valid choices: {', '.join(names())} (a task defined outside the "
                     f"package is registered by naming its module in {PLUGINS_ENV})") from None


def build(config):
  """The task named by `config.task`, constructed with the whole config."""
  return get(config.task)(config)


def import_plugins(value: str | None = None) -> list[str]:
  """Imports the modules named in `value` (default: the `TASK_PLUGINS` environment variable); their names. One loader
  for both plugin kinds (`attention.plugins.import_modules`): a module that cannot be imported is a one-line
  ValueError naming it, the variable and the fix."""
  return plugins.import_modules(PLUGINS_ENV, value)
