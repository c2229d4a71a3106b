"""jaxjpq: joint structured pruning and mixed-precision quantization for JAX/Flax.

The core: ``init`` traces a model into a :class:`Graph` (QADG, :mod:`jaxjpq.trace`) and returns
the pair :class:`CompressedParams` ``(model params, CompressionState)``; the state carries its
graph, so the compressed forward (``compress_apply``), the figures (``cost``), ``slim``,
``export`` and ``deploy`` (the slim integer model a user ships) take the state alone. Methods
(``geta``, ``djpq``, ``prune_then_quantize``, ``qat``) are factories of optax transforms over the
pair, built on :mod:`jaxjpq.methods.core`; ``fit`` and ``ajpq`` search a state for the ``qat``
fine-tune; :mod:`jaxjpq.methods.registry` builds any of them by name.
"""

from jaxjpq import cost, data, deployment, export, gates, models, nnx, quant, trace, train
from jaxjpq.compress import calibrate, compress_apply
from jaxjpq.deployment import DeployedModel, deploy
from jaxjpq.forward import CompressedForward
from jaxjpq.graph import AxisUnits, Graph, Group, MacTerm, Site, Slice
from jaxjpq.methods import ajpq, fit
from jaxjpq.methods.baselines import prune_then_quantize
from jaxjpq.methods.core import enforce_budget, qat, set_bits, within_budget
from jaxjpq.methods.djpq import djpq
from jaxjpq.methods.geta import geta
from jaxjpq.slim import apply_masks, slim
from jaxjpq.state import CompressedParams, CompressionSpec, CompressionState, init, init_state
from jaxjpq.trace import Rule, register_rule
from jaxjpq.trace.macs import MacCount, count_macs, count_macs_split, eqn_macs

__all__ = [
    "AxisUnits",
    "CompressedForward",
    "CompressedParams",
    "CompressionSpec",
    "CompressionState",
    "DeployedModel",
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
    "deploy",
    "deployment",
    "djpq",
    "eqn_macs",
    "enforce_budget",
    "export",
    "fit",
    "gates",
    "geta",
    "init",
    "init_state",
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
