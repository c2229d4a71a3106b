"""Export size and fidelity: the MNIST CNN at mixed 2-8 bits with 50 % of every prunable group's
channels pruned, packed, saved with orbax, restored and run.

Run: python -m experiments.bench_export
"""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxjpq import cost, export
from jaxjpq.compress import calibrate, compress_apply
from jaxjpq.models import MnistCNN
from jaxjpq.quant import step_from_bits
from jaxjpq.state import CompressionSpec, init_state
from jaxjpq.trace import trace


def main() -> dict:
    """Print the figures; return them (bytes, and the restored model's largest deviation)."""
    model = MnistCNN()
    x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
    v = model.init(jax.random.key(0), x)
    graph = trace(model.apply, v, x)
    fn = compress_apply(model.apply)
    st = calibrate(fn, v, init_state(graph, CompressionSpec(), v), [x])
    bits = {"Conv_0": 8, "Conv_1": 3, "Dense_0": 2, "Dense_1": 5}  # mixed 2-8 bits
    rng = np.random.default_rng(0)
    st = st.replace(
        weight={
            k: p.replace(d=step_from_bits(float(bits[k]), p.q_m, p.t)) for k, p in st.weight.items()
        },
        masks={
            k: jnp.asarray(rng.permutation(np.arange(m.size) < m.size // 2), jnp.float32)
            for k, m in st.masks.items()
        },
    )  # 50 % of channels pruned
    packed = export.pack(v, st)
    d = os.path.join(tempfile.mkdtemp(), "model")
    export.save(d, packed)
    th = export.theoretical_bytes(packed)
    model_bytes = cost.size_bits(st, include_scales=True, include_other=True) / 8
    print(cost.report(st))
    fp32 = sum(a.size for a in jax.tree.leaves(v)) * 4
    print(f"fp32 weights+biases: {fp32} B")
    print(
        f"theoretical: codes {th['codes']:.0f} B + scales {th['scales']:.0f} B + float leaves "
        f"{th['float']:.0f} B = {th['total']:.0f} B; cost model {model_bytes:.0f} B"
    )
    disk = export.disk_bytes(d)
    print(f"on disk (orbax dir): {disk} B = {disk / th['total']:.3f}x of theoretical")
    y_fake = jax.jit(fn)(v, st, x)
    y_int = jax.jit(export.inference_fn(export.restore(d), model.apply, graph))(x)
    diff = float(jnp.max(jnp.abs(y_int - y_fake)))
    print("max |restored - fake-quant| =", diff)
    return dict(fp32=fp32, theoretical=th["total"], cost_model=float(model_bytes), disk=disk,
                max_diff=diff, max_out=float(jnp.max(jnp.abs(y_fake))))


if __name__ == "__main__":
    main()
