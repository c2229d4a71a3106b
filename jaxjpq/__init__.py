"""jaxjpq: joint structured pruning and mixed-precision quantization for JAX/Flax.

The core: ``trace`` a model into a :class:`Graph` (QADG), ``init`` a :class:`CompressionState`
from a :class:`CompressionSpec`, run the compressed forward from ``compress_apply``, measure it
with ``cost``, ``slim`` it and ``export`` it. Methods (``geta``, ``djpq.transform``, baselines)
are optax transforms over ``(params, CompressionState)``.
"""

from jaxjpq import cost, data, export, gates, macs, models, quant, train
from jaxjpq.compress import calibrate, compress_apply
from jaxjpq.graph import Graph, Group, Site, Slice
from jaxjpq.macs import MacCount, count_macs, count_macs_split, eqn_macs
from jaxjpq.methods import djpq
from jaxjpq.methods.baselines import prune_then_quantize
from jaxjpq.methods.driver import CompressedForward, compression_metrics
from jaxjpq.methods.geta import geta
from jaxjpq.slim import apply_masks, slim
from jaxjpq.state import CompressionSpec, CompressionState, init
from jaxjpq.trace import trace

__all__ = [
    "CompressedForward",
    "CompressionSpec",
    "CompressionState",
    "Graph",
    "Group",
    "MacCount",
    "Site",
    "Slice",
    "apply_masks",
    "calibrate",
    "compress_apply",
    "compression_metrics",
    "cost",
    "count_macs",
    "count_macs_split",
    "data",
    "djpq",
    "eqn_macs",
    "export",
    "gates",
    "geta",
    "init",
    "macs",
    "models",
    "prune_then_quantize",
    "quant",
    "slim",
    "trace",
    "train",
]
__version__ = "0.1.0"
