"""The hand-over from a layer's `update` to the attention function that runs right after it, for the same layer,
and the one protocol between them.

`update` leaves its layer here (`leave_pending`); h2o's attention function takes it (`take_pending`), checking that it
received that layer's keys, and calls the layer's `attend` (`AttendingLayer`) with an `AttentionCall`: what this call of
the attention function knows (the stock attention, its module, scaling and options) and the one thing a layer cannot
do by itself, run one `CompressedLayer`'s attention with what its policy observes (`AttentionCall.compressed`). Each
layer kind says how its heads or rows map onto such runs (a head group, a row, the static layout's own step); the
attention function imports no layer class. Below every layer kind and the attention function, so that neither imports
the other for it.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import torch


class AttentionCall(Protocol):
    """One call of h2o's attention function, as the layer kinds see it."""

    def compressed(self, layer, query: torch.Tensor, attention_mask) -> torch.Tensor:
        """One `CompressedLayer`'s attention over its own keys and values (prepare, attention with exactly what its
        policy observes, observe: the layer's policy updates and the layer evicts, unless it is joint). query
        [B, Hq, q, D] holds the query heads of the layer's KV heads; returns the output [B, q, Hq, Dv]."""

    def row(self, b: int, rows: int, query: torch.Tensor, attention_mask) -> tuple["AttentionCall", torch.Tensor, object]:
        """Row b of a forward of `rows` rows: (this call for that row alone, its query, its mask)."""

    def plain_softmax(self) -> bool:
        """Whether this call's attention is plain softmax (no dropout, softcapping, position bias, attention sinks)."""

    def scale(self, query: torch.Tensor) -> float:
        """The softmax scaling of this call (the model's, or 1/sqrt(head dim))."""


@runtime_checkable
class AttendingLayer(Protocol):
    """What every h2o layer kind gives the attention function: its attention output for a forward's query."""

    def attend(self, call: AttentionCall, query: torch.Tensor, attention_mask) -> torch.Tensor:
        """The layer's attention output [B, q, Hq, Dv] for `query` [B, Hq, q, D], observed and (as the layer kind
        decides) evicted."""


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


def take_pending(key: torch.Tensor) -> AttendingLayer | None:
    if torch.compiler.is_compiling():
        layer = _traced["layer"]
        _traced["layer"] = None
    else:
        layer = getattr(_pending, "layer", None)
        _pending.layer = None
    return layer if layer is not None and layer.keys is key else None
