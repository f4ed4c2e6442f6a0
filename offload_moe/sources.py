"""Where the tensors of an expert that is not in a slot come from, behind one small interface.

By default the mover reads every missing expert into a slot, and the cache has no source. A source serves
some experts without a slot; the expert cache asks it three things, and never which source it has:

- ``view(layer, expert)``: the expert's tensors without a slot, or None when it must be read into one;
- ``read_ahead(key, flow)``: a prefetch served without a slot (True), or one that needs a slot (False);
- ``settle(layer, experts, resident, flow)``: ``layer`` runs now with ``experts``; score what was read ahead.

``MappedSource`` (``io="mmap"`` with slots on the CPU): a missing expert is computed from views of the mapped
checkpoint. On CPU the page cache already keeps what was read, in all the memory the kernel can spare, and a
copy into a slot would only cost time; the slots serve when they hold every expert (filled at load). A
prefetch asks the kernel to read the expert ahead instead of taking a slot. A source never calls the cache:
it is handed what it needs.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Protocol

import torch

from .errors import CheckpointError
from .formats import ExpertFormat

Key = tuple[int, int]  # (layer, expert)


class Source(Protocol):
    def view(self, layer: int, expert: int) -> dict | None: ...

    def read_ahead(self, key: Key, flow) -> bool: ...

    def settle(self, layer: int, experts: Sequence[int], resident: Container[Key], flow) -> None: ...


class MappedSource:
    """``io="mmap"`` on CPU: a missing expert is computed in place from views of the mapped ``store``.

    Experts that cannot be viewed (another dtype, a transposed layout, a file that cannot be mapped)
    are read into slots, as without a source.
    """

    def __init__(self, store, dtype: torch.dtype):
        self.store = store
        self.dtype = dtype
        self._advised: set[Key] = set()  # prefetched: the kernel was asked to read them ahead
        self._ahead: set[Key] = set()  # of the layer running now, the wanted ones that were read ahead (``settle``)

    def view(self, layer: int, expert: int) -> dict | None:
        """The expert's tensors in the mapping, the kernel asked to read them now; raises CheckpointError if
        its file changed on disk since load (truncated, replaced, removed)."""
        weights = self.store.mapped(layer, expert, self.dtype)
        if weights is not None and (layer, expert) not in self._ahead:  # a prefetch asked for it already
            self.store.willneed(layer, expert)
        return weights

    def read_ahead(self, key: Key, flow) -> bool:
        """Prefetch a mappable expert by asking the kernel to read it ahead (no slot is taken)."""
        if key in self._advised:
            return True
        try:
            if self.store.mapped(*key, self.dtype) is None:
                return False
        except CheckpointError:
            return True  # its file changed on disk: nothing to read ahead; the layer that needs it reports why
        self.store.willneed(*key)
        self._advised.add(key)
        flow.prefetch_issued += 1
        return True

    def settle(self, layer: int, experts: Sequence[int], resident: Container[Key], flow) -> None:
        """Score the read-ahead advice given for ``layer``, which runs now with ``experts`` (``resident``: the keys in slots);
        remember the wanted ones, which ``view`` does not advise again."""
        self._ahead.clear()
        if not self._advised:
            return
        wanted = set(experts)
        for key in [k for k in self._advised if k[0] == layer]:
            self._advised.discard(key)
            if key[1] not in wanted:
                flow.prefetch_wasted += 1
                continue
            flow.prefetch_used += 1
            if key not in resident:
                flow.mapped_ahead += 1
                self._ahead.add(key)


def make_source(store, device: torch.device, dtype: torch.dtype, held: ExpertFormat | None = None) -> Source | None:
    """The source for a store opened with ``io`` and slots on ``device``; None when every missing expert is read
    into a slot: without a mapping, and where the slots hold the experts in another ``held`` format than the store
    (int4 in this CPU's kernel layout, ``kernels.held_format``): a view of the mapping would need that conversion at
    every call, where a slot needs it once a fill."""
    if getattr(store, "maps", None) is None or device.type != "cpu":
        return None
    if held is not None and held.int4_layout != store.format.int4_layout:
        return None
    return MappedSource(store, dtype)
