"""Command-line entry points: user errors as one line `error: ...` with exit status 2; bugs keep their traceback.

Use it in place of `absl.app.run` in every script:

  from lra import cli

  def main(argv):
    if len(argv) > 1:
      raise cli.UserError(f"unexpected arguments: {argv[1:]}")
    ...

  if __name__ == "__main__":
    cli.run(main)

What counts as a user error (config, flags, data): `UserError`, `ValueError` (config values and validation, bad
records), `FileNotFoundError` (missing data or runs), `absl.app.UsageError`, and any error while the flags are parsed
(unknown flag, missing required flag, an unknown `--config.key`, a value of the wrong type, a bad `:arg`). They
print one line on stderr and exit with 2, however deep they were raised (inside `jax.jit`, a Flax module's init...):
the message is the whole report. Set `LRA_TRACEBACK=1` in the environment to see their traceback too.

Everything else (TypeError, AttributeError, FloatingPointError from a NaN loss...) propagates with its traceback.
A run stopped by SIGTERM/SIGINT (`lra.training.preemption.Preempted`) prints its one line ("preempted at step N:
checkpoint saved ...; rerun the same command to resume") and exits with 128 + the signal number.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags

EXIT_USER_ERROR = 2
TRACEBACK_ENV = "LRA_TRACEBACK"


class UserError(Exception):
  """A mistake in the command line, config or data, reported as one `error: ...` line (exit status 2)."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, flags.Error,
                                                app.UsageError)


def _message(error: BaseException) -> str:
  # ml_collections wraps a KeyError in an AttributeError for an unknown `--config.x.y`; KeyError quotes its message.
  if error.args and isinstance(error.args[0], BaseException):
    return _message(error.args[0])
  if isinstance(error, KeyError) and error.args:
    return str(error.args[0])
  return str(error)


def _one_line(error: BaseException) -> str:
  text = _message(error).strip() or type(error).__name__
  if isinstance(error, FileNotFoundError) and error.filename and error.filename not in text:
    text = f"{text}: {error.filename}"
  # A multi-line message (e.g. from a wrapped library error) is joined so the report stays one line.
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _root_user_error(error: BaseException) -> BaseException | None:
  """`error` or the user error it wraps (Flax and JAX re-raise some errors with the original as the cause)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, USER_ERRORS):
      return error
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
  return None


def check_flag(holder: flags.FlagHolder, predicate: Callable[[Any], bool], expected: str) -> None:
  """Refuses a value of the flag for which `predicate` is false (an unset None always passes) while the flags are
  parsed: one line `error: flag --name=value: expected <expected>`, exit status 2. For counts, durations and other
  values absl's `lower_bound=` cannot say (strictly positive floats, lists of lengths)."""
  flags.register_validator(holder.name, lambda value: value is None or predicate(value),
                           message=f"expected {expected}")


def positive_ints(values: Sequence[str]) -> bool:
  """Every item of a list flag is an integer > 0 (sequence lengths, sizes)."""
  return all(str(v).strip().isdigit() and int(v) > 0 for v in values)


def report(error: BaseException) -> NoReturn:
  """Prints `error: <message>` on stderr and exits with status 2."""
  print(f"error: {_one_line(error)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    report(e)
  except (ValueError, KeyError, AttributeError, TypeError) as e:
    # Raised while loading the config file or applying `--config.key=value` overrides: an unknown key (KeyError
    # wrapped in AttributeError by ml_collections), a value of the wrong type, a bad `:arg`.
    if os.environ.get(TRACEBACK_ENV):
      raise
    report(UserError(f"command line: {_one_line(e)}"))


def _guarded(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  from lra.training.preemption import Preempted  # pylint: disable=g-import-not-at-top  (imports jax)
  try:
    return main(argv)
  except Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except Exception as e:  # pylint: disable=broad-except
    user_error = _root_user_error(e)
    if user_error is None or os.environ.get(TRACEBACK_ENV):
      raise
    report(user_error)


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main)` with flag errors and user errors as one line and exit status 2."""
  app.run(lambda args: _guarded(main, args), argv=list(argv) if argv is not None else None,
          flags_parser=_parse_flags)
