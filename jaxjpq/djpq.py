"""``jaxjpq.djpq``: DJPQ (VIB gates + learned bits under a BOPs target).

Call it like :func:`jaxjpq.geta`: ``jaxjpq.djpq(inner, graph, steps=...)``; the module also holds
``init``, ``init_state``, ``penalty``, ``loss`` (see :mod:`jaxjpq.methods.djpq`).
"""

import sys
import types

from jaxjpq.methods.djpq import (  # noqa: F401
    DjpqState,
    djpq,
    init,
    init_state,
    loss,
    penalty,
    transform,
)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return djpq(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
