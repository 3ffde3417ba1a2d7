r"""Multi-host check: 2 local processes x 2 CPU devices (gloo collectives) must give the losses of one process.

  python scripts/check_multihost.py

Kept out of the pytest suite: under heavy CPU load the two gloo processes were seen to hang once (in CI that would
block the whole suite); run it by hand after touching sharding, checkpoints or the data pipeline.
"""

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lra.training import train_and_evaluate  # noqa: E402
from lra.training.metric_writers import read_metrics  # noqa: E402
from tests.conftest import tiny_listops_config  # noqa: E402
MULTI_HOST_SCRIPT = textwrap.dedent("""
    import sys
    from lra.training import train_and_evaluate
    from tests.conftest import tiny_listops_config
    import jax
    config = tiny_listops_config(sys.argv[1], num_steps=6, log_every_steps=1, eval_every_steps=6,
                                 checkpoint_every_steps=3)
    train_and_evaluate(config, sys.argv[2])
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
""")


def check(data_cache, tmp_path):
  """Multi-host: 2 local processes x 2 CPU devices (gloo collectives) give the losses of one process."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  procs = []
  for i in range(2):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT), "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(i), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs.append(subprocess.Popen([sys.executable, "-c", MULTI_HOST_SCRIPT, str(data_cache), str(tmp_path / "mh")],
                                  env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  config = tiny_listops_config(data_cache, num_steps=6, log_every_steps=1, eval_every_steps=6,
                               checkpoint_every_steps=3)
  train_and_evaluate(config, tmp_path / "single")
  multi = [r for r in read_metrics(tmp_path / "mh") if r["split"] == "train"]
  single = [r for r in read_metrics(tmp_path / "single") if r["split"] == "train"]
  assert len(multi) == 6
  np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=2e-5)
  assert (tmp_path / "mh" / "checkpoints" / "6").exists()


if __name__ == "__main__":
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    check(tmp / "cache", tmp)
  print("multi-host check passed: 2 processes x 2 devices match 1 process")
