"""`SharedBudget`: one budget shared across layers, so that the cache evicts all its layers together after a forward.

A per-layer cache cuts each layer back right after that layer's attention (each layer its own budget). A shared
budget's layers (`RowsLayer`s, joint in every head) never evict by themselves: each reports to the budget once its
attention has observed a forward, and once every layer of the budget has, the budget runs one joint split per row
over every layer's and KV head's slots together (`split_evict`: one top-k over the rule's priorities of all of them,
each head keeping its floor). So after every forward the cache holds at most layers x heads x budget tokens per row
(+ the buffers), shared as the priorities say; during a forward each layer holds what it was given until the last
layer has run (a prefill holds the whole prompt's keys and values in every layer until then, as a full cache does).

A forward that does not reach every layer of the budget (an exception in between, a model that skips layers) would
leave it unable to evict: the next forward's first report raises instead.
"""

from __future__ import annotations

from .head_group_layer import split_evict


class SharedBudget:
    """Layers sharing `total` kept tokens per row (each KV head at least `floor`), evicted together."""

    def __init__(self, total: int, floor: int, buffer: int):
        self.total, self.floor, self.buffer = total, floor, buffer
        self.layers: list = []
        self._reported: set[int] = set()  # ids of the layers observed in the current forward

    def join(self, layer) -> None:
        self.layers.append(layer)
        layer.shared = self

    def observed(self, layer) -> bool:
        """A layer's attention has observed this forward; the last of them evicts all together."""
        if id(layer) in self._reported:
            raise RuntimeError(
                f"a layer sharing a budget with {len(self.layers) - 1} others was observed twice before they all "
                f"were ({len(self._reported)} of {len(self.layers)} in this forward): a forward did not reach every "
                "layer, so the shared budget could not evict. reset() the cache (or make a new one) after an "
                "interrupted forward; a model that skips layers cannot share a budget across them")
        self._reported.add(id(layer))
        if len(self._reported) < len(self.layers):
            return False
        self._reported.clear()
        return self.evict()

    def evict(self) -> bool:
        """One joint split per row over every layer's KV heads (a row as if it ran alone)."""
        rows = {len(layer.rows) for layer in self.layers}
        if len(rows) != 1:
            raise RuntimeError(f"the layers of a shared budget hold different numbers of rows: {sorted(rows)}")
        evicted = False
        for b in range(rows.pop()):
            heads = [sub for layer in self.layers for sub in layer.rows[b].sublayers]
            evicted |= split_evict(heads, self.total, self.floor, self.buffer)
        return evicted

    def reset(self) -> None:
        self._reported.clear()
