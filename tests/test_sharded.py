"""Each data-parallel training step over 8 virtual CPU devices gives the 1-device step's masks,
bits and, within a bound set by float32 summation order, its params and quantizer state (GETA,
DJPQ, every stage of a 12-step run); evaluation pads to the device count; FIT's Fisher pass split
over the devices equals the 1-device one.

The two programs differ only in the order of float32 sums (each device convolves 2 examples
instead of 16, and the gradient is all-reduced). The step is compared with weight quantizers
(computed from the same params on both sides, so identical) and without activation quantizers:
an activation quantizer is a step function of its input, so a summation-order difference of one
ulp can move an activation across a rounding boundary and change the gradient by a whole step
of the quantizer, on any machine whose kernels block the sums differently."""

import json
import pathlib

from devices import TESTS, run_on_devices

_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import chex, jax, numpy as np, optax
from jaxjpq import cost, data, train
from jaxjpq.methods import djpq
from jaxjpq.methods.geta import geta
from jaxjpq.train import CompressedForward
from helpers import geta_setup, random_source

assert len(jax.devices()) == 8
src = random_source(96)
from jaxjpq.state import CompressionSpec, init_state
model, v, g, _, _, _ = geta_setup()
spec = CompressionSpec(bits=(2.0, 4.0), budget={{"sparsity": 0.5}}, quantize_activations=False)
cstate = init_state(g, spec, v)
steps, lr = 12, 1e-3
# Per step, each gradient entry differs by at most ~16 * 2**-24 of the sum of its |terms| (16
# examples, float32). Adam's step lr * m / (sqrt(v) + eps) changes by that relative amount where
# the gradient does not cancel; 1e4 covers entries whose terms cancel to 1e-4 of their sum.
atol = lr * 16 * 2.0**-24 * 1e4

def make(method):
    if method == "geta":
        tx = geta(optax.adam(lr), steps=steps)
        pair = (v["params"], cstate)
    else:
        tx = djpq.djpq(optax.adam(lr), steps=steps, target_bops=0.05, warmup=0)
        pair = djpq.init(g, v, spec=CompressionSpec(bits=(2.0, 8.0), learn_t=False,
                                            quantize_activations=False),
                         key=jax.random.PRNGKey(3))
    return train.create_train_state(CompressedForward(model.apply), {{"params": pair}}, tx)

mesh = train.data_mesh()
for method in ("geta", "djpq"):
    # Step by step from the same state: Adam amplifies the summation-order differences over a
    # run, so whole runs are not comparable, but each step is.
    state = make(method)
    for k in range(steps):
        one, _ = train.train(state, data.batch_stream(src, 16, seed=0, start_step=k), k + 1,
                             progress=False)
        many, _ = train.train(state, data.batch_stream(src, 16, seed=0, start_step=k), k + 1,
                              progress=False, mesh=mesh)
        assert len(many.params[0]["Conv_0"]["kernel"].sharding.device_set) == 8
        many = jax.device_get(many)
        chex.assert_trees_all_equal(many.params[1].masks, one.params[1].masks)
        assert cost.bits(many.params[1]) == cost.bits(one.params[1]), (method, k)
        chex.assert_trees_all_close(many.params, one.params, atol=atol, rtol=0)
        _ = state.params[0]["Conv_0"]["kernel"].block_until_ready()  # not donated away
        state = one
    batches = lambda: data.batches(src, 20, shuffle=False, drop_remainder=False)  # 96 = 4x20+16
    e1 = train.evaluate(one, batches(), 20)
    e8 = train.evaluate(one, batches(), 20, mesh=mesh)  # padded to 24 per batch
    assert e1["count"] == e8["count"] == 96
    np.testing.assert_allclose(e8["accuracy"], e1["accuracy"])
    np.testing.assert_allclose(e8["loss"], e1["loss"], rtol=1e-5)
from jaxjpq.methods import fit
xf, yf = src["inputs"][:40], src["labels"][:40]
f1 = fit.fisher(model.apply, g, v, [{{"inputs": xf, "labels": yf}}], chunk=16, progress=False)
f8 = fit.fisher(model.apply, g, v, [{{"inputs": xf, "labels": yf}}], chunk=16, progress=False,
                mesh=mesh)  # chunks of 16, 16 on 8 devices, the last 8 on 8
for k in f1.weight:
    np.testing.assert_allclose(f8.weight[k], f1.weight[k], rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(f8.act[k], f1.act[k], rtol=1e-4)
try:
    train.train(make("geta"), data.batch_stream(src, 12, seed=0), 2, progress=False, mesh=mesh)
except ValueError as e:
    assert "does not split over the 8 devices" in str(e)
else:
    raise AssertionError("a batch of 12 on 8 devices was not refused")
print("OK")
"""


def test_eight_device_training_matches_one_device():
    assert "OK" in run_on_devices(_SCRIPT.format(tests=TESTS), 8).stdout


def test_an_experiment_runs_data_parallel(tmp_path):
    root = pathlib.Path(TESTS).parent
    run_on_devices(
        "", 4, "-m", "experiments.run",
        "--config", str(root / "experiments" / "configs" / "geta_mnist_cnn.py"),
        "--config.num_steps=20", "--config.data.train_limit=128", "--config.batch_size=32",
        "--config.progress=False", "--config.model.hidden=8", "--config.data.eval_limit=100",
        "--config.data_parallel=True", "--config.checkpoint_every=10",
        "--workdir", str(tmp_path / "w"))
    saved = json.loads((tmp_path / "w" / "results.json").read_text())
    assert saved["num_devices"] == 4 and saved["steps"] == 20
    assert saved["compression"]["export"]["restored_test_accuracy"] == saved["test_accuracy"]
