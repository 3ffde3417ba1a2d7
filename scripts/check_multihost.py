r"""Multi-host check: train.py in 2 local processes x 2 CPU devices (gloo collectives) finishes within a time limit
and gives the losses of one process.

  python scripts/check_multihost.py            # once
  for i in $(seq 10); do python scripts/check_multihost.py || break; done

The same check runs in the suite (tests/lra/test_multihost.py); this script repeats it by hand, e.g. after touching
sharding, checkpoints or the data pipeline. A hang is killed after --timeout seconds and reported as a failure.
"""

import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import flags  # noqa: E402

from lra import cli  # noqa: E402

_TIMEOUT = flags.DEFINE_float("timeout", 240.0, "Seconds before both processes are killed and the check fails.")
cli.check_flag(_TIMEOUT, lambda seconds: seconds > 0, "a positive number of seconds")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  start = time.monotonic()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    check(tmp / "cache", tmp)
  print(f"multi-host check passed in {time.monotonic() - start:.1f} s: 2 processes x 2 devices match 1 process")


def check(data_cache: pathlib.Path, tmp_path: pathlib.Path) -> None:
  """tests/lra/test_multihost.py's test, with this script's --timeout."""
  from tests.lra import multihost_support  # pylint: disable=g-import-not-at-top
  from tests.lra import test_multihost  # pylint: disable=g-import-not-at-top
  original = multihost_support.run_processes

  def with_timeout(argv, **kwargs):
    return original(argv, **{**kwargs, "timeout": _TIMEOUT.value})
  test_multihost.run_processes = with_timeout
  try:
    test_multihost.two_processes_train_like_one(data_cache, tmp_path)
  finally:
    test_multihost.run_processes = original


if __name__ == "__main__":
  cli.run(main)
