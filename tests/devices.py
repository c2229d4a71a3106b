"""Run a snippet in a fresh interpreter with ``n`` virtual CPU devices (the flag must be set
before jax starts)."""

import os
import pathlib
import subprocess
import sys

TESTS = str(pathlib.Path(__file__).resolve().parent)


def run_on_devices(code: str, n: int, *args: str, timeout: int = 600
                   ) -> subprocess.CompletedProcess:
    """``python -c code`` (or ``python *args`` when ``code`` is empty) from the repository root
    with ``n`` CPU devices; asserts a zero exit status, showing the child's stderr."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=pathlib.Path(TESTS).parent, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
