"""The hand-over from a layer's `update` to the attention function that runs right after it, for the same layer.

`update` leaves its layer here (`leave_pending`); h2o's attention function takes it (`take_pending`), checking that it
received that layer's keys. Below every layer kind and the attention function, so that neither imports the other for it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers.cache_utils import CacheLayerMixin


# The layer whose `update` ran last on this thread. The attention function of the same layer
# runs right after it and picks it up (checking it received that layer's keys).
_pending = threading.local()
# The same hand-over while torch.compile traces a forward (h2o.static): a plain dict, whose stores dynamo follows
# into later loads of the same trace, also across a torch.cond (it does not for a threading.local, nor for an
# object's attribute once a torch.cond was traced in between).
_traced: dict = {"layer": None}


def leave_pending(layer) -> None:
    """`update`'s hand-over of its layer to the attention function that runs next."""
    if torch.compiler.is_compiling():
        _traced["layer"] = layer
    else:
        _pending.layer = layer


def take_pending(key: torch.Tensor) -> "CacheLayerMixin | None":
    if torch.compiler.is_compiling():
        layer = _traced["layer"]
        _traced["layer"] = None
    else:
        layer = getattr(_pending, "layer", None)
        _pending.layer = None
    return layer if layer is not None and layer.keys is key else None
