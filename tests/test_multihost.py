"""Two processes (``jax.distributed`` over localhost, gloo collectives, 2 CPU devices each)
train as one 4-device data-parallel job: each reads its own rows of every batch, and the masks,
bits and params equal one process's training on whole batches; an experiment run with
``config.distributed`` over two one-device processes writes the ``results.json`` of the 2-device
single-process run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from devices import TESTS, run_on_devices

ROOT = pathlib.Path(TESTS).parent

_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import jax
jax.distributed.initialize()
import chex, numpy as np, optax
from jaxjpq import cost, data, train
from jaxjpq.methods import djpq
from jaxjpq.state import CompressionSpec
from jaxjpq.train import CompressedForward
from helpers import geta_setup, random_source

pid, n = jax.process_index(), jax.process_count()
assert (n, jax.device_count(), jax.local_device_count()) == (2, 4, 2)
src = random_source(96)
model, v, g, _, spec, cstate = geta_setup()
steps = 12

def make():
    tx = djpq.djpq(optax.adam(1e-3), steps=steps, target_bops=0.02, warmup=0)
    pair = djpq.init(g, v, spec=CompressionSpec(bits=(2.0, 8.0), learn_t=False),
                     key=jax.random.PRNGKey(3))
    return train.create_train_state(CompressedForward(model.apply), {{"params": pair}}, tx)

one, _ = train.train(make(), data.batch_stream(src, 16, seed=0), steps, progress=False)
mesh = train.data_mesh()
many, _ = train.train(make(), data.batch_stream(src, 16, seed=0, shard=(pid, n)), steps,
                      progress=False, mesh=mesh)
many = train.host_value(many)
chex.assert_trees_all_equal(many.params[1].masks, one.params[1].masks)
assert cost.bits(many.params[1]) == cost.bits(one.params[1])
chex.assert_trees_all_close(many.params[0], one.params[0], atol=1e-5)
full = train.evaluate(one, data.batches(src, 20, shuffle=False, drop_remainder=False), 20)
part = train.evaluate(one, data.batches(src, 20, shuffle=False, drop_remainder=False,
                                        shard=(pid, n)), 20, mesh=mesh)
assert part["count"] == full["count"] == 96, part
np.testing.assert_allclose(part["loss"], full["loss"], rtol=1e-5)
print("OK", pid)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(args: list[str], n: int = 2, devices: int = 2, timeout: int = 600
                  ) -> list[str]:
    """``python *args`` as ``n`` processes of one ``jax.distributed`` job on this machine;
    asserts each exits with 0 and returns their stdouts."""
    base = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}",
            "JAX_NUM_PROCESSES": str(n)}
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True,
                              env={**base, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(n)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return [o for o, _ in outs]


def _init_from_env() -> str:
    """``jax.distributed.initialize()`` reads no process count or id from the environment on
    a bare machine: the snippet gets them from the variables run_processes sets."""
    return ("import os, jax\n_init = jax.distributed.initialize\n"
            "jax.distributed.initialize = lambda: _init(num_processes=int(os.environ"
            "['JAX_NUM_PROCESSES']), process_id=int(os.environ['JAX_PROCESS_ID']))\n")


def test_two_processes_train_as_one_data_parallel_job():
    outs = run_processes(["-c", _init_from_env() + _SCRIPT.format(tests=TESTS)])
    assert [o.split()[-2:] for o in outs] == [["OK", "0"], ["OK", "1"]]


def test_a_distributed_experiment_equals_the_single_process_one(tmp_path):
    # One device per process against one process with two devices: the all-reduce then adds
    # two partial sums, and a + b == b + a in floating point, so the two runs are bitwise equal.
    # (With more devices the reduction order differs, and quantized training turns its last-bit
    # differences into other rounding and pruning decisions within a few steps.)
    flags = ["-m", "experiments.run",
             "--config", str(ROOT / "experiments" / "configs" / "geta_mnist_cnn.py"),
             "--config.num_steps=12", "--config.data.train_limit=128", "--config.batch_size=32",
             "--config.progress=False", "--config.model.hidden=8", "--config.data.eval_limit=100",
             "--config.checkpoint_every=6", "--config.deploy_rounds=0"]
    run_processes([*flags, "--config.distributed=True", "--workdir", str(tmp_path / "multi")],
                  devices=1)
    run_on_devices("", 2, *flags, "--config.data_parallel=True", "--workdir",
                   str(tmp_path / "single"))
    multi, single = (json.loads((tmp_path / w / "results.json").read_text())
                     for w in ("multi", "single"))
    assert multi["num_devices"] == single["num_devices"] == 2
    assert multi["steps"] == 12
    for key in ("test_accuracy", "val_accuracy"):  # counts of correct predictions: exact
        assert multi[key] == single[key], (key, multi[key], single[key])
    # an evaluation's loss adds per-batch float32 sums in another order across the hosts: a
    # sum of n positive terms reordered moves by at most (n - 1)·2⁻²⁴ relative (n ≤ 100 here)
    for key in ("test_loss", "val_loss"):
        np.testing.assert_allclose(multi[key], single[key], rtol=100 * 2.0**-23, err_msg=key)
    assert multi["final_train_window"] == single["final_train_window"]
    for key in ("kept_units", "bits", "rel_bops", "rel_size"):
        assert multi["compression"][key] == single["compression"][key], key
    assert multi["compression"]["export"]["restored_test_accuracy"] == multi["test_accuracy"]
