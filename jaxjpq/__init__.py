"""jaxjpq: joint structured pruning and mixed-precision quantization for JAX/Flax.

The core: ``trace`` a model into a :class:`Graph` (QADG), ``init`` the pair
:class:`CompressedParams` ``(model params, CompressionState)`` from a :class:`CompressionSpec`,
run the compressed forward from ``compress_apply``, measure it with ``cost``, ``slim`` it and
``export`` it. Methods (``geta``, ``djpq``, ``prune_then_quantize``, ``qat``) are optax
transforms over the pair, built on :mod:`jaxjpq.methods.core`; ``fit`` and ``ajpq`` search a
state for the ``qat`` fine-tune.
"""

from jaxjpq import cost, data, djpq, export, gates, macs, models, nnx, quant, train
from jaxjpq.compress import calibrate, compress_apply
from jaxjpq.graph import AxisUnits, Graph, Group, MacTerm, Site, Slice
from jaxjpq.macs import MacCount, count_macs, count_macs_split, eqn_macs
from jaxjpq.methods import ajpq, fit
from jaxjpq.methods.baselines import prune_then_quantize
from jaxjpq.methods.core import enforce_budget, qat, set_bits, within_budget
from jaxjpq.methods.geta import geta
from jaxjpq.slim import apply_masks, slim
from jaxjpq.state import CompressedParams, CompressionSpec, CompressionState, init, init_state
from jaxjpq.trace import Rule, register_rule, trace
from jaxjpq.train import CompressedForward

__all__ = [
    "AxisUnits",
    "CompressedForward",
    "CompressedParams",
    "CompressionSpec",
    "CompressionState",
    "Graph",
    "Group",
    "MacCount",
    "MacTerm",
    "Rule",
    "Site",
    "Slice",
    "ajpq",
    "apply_masks",
    "calibrate",
    "compress_apply",
    "cost",
    "count_macs",
    "count_macs_split",
    "data",
    "djpq",
    "eqn_macs",
    "enforce_budget",
    "export",
    "fit",
    "gates",
    "geta",
    "init",
    "init_state",
    "macs",
    "models",
    "nnx",
    "prune_then_quantize",
    "qat",
    "quant",
    "register_rule",
    "set_bits",
    "slim",
    "trace",
    "train",
    "within_budget",
]
__version__ = "0.1.0"
