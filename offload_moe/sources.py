"""Where the tensors of an expert that is not in a slot come from, behind one small interface.

The expert cache asks its source three things, and never which source it has:

- ``view(layer, expert)``: the expert's tensors without a slot, or None when it must be read into one;
- ``read_ahead(key, flow)``: a prefetch served without a slot (True), or one that needs a slot (False);
- ``settle(layer, experts, resident, flow)``: ``layer`` runs now with ``experts``; score what was read ahead.

``SlotSource`` (``io`` direct, dontneed or buffered, and every GPU): every missing expert is read into a
slot by the mover. ``MappedSource`` (``io="mmap"`` with slots on the CPU): a missing expert is computed
from views of the mapped checkpoint instead. On CPU the page cache already keeps what was read, in all
the memory the kernel can spare, and a copy into a slot would only cost time; the slots serve when they
hold every expert (filled at load). A prefetch asks the kernel to read the expert ahead instead of taking
a slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .errors import CheckpointError

Key = tuple[int, int]  # (layer, expert)


class Source(Protocol):
    needs_slots: bool  # a prefetch that finds no free slot ends the prefetch round (the others would find none)

    def view(self, layer: int, expert: int) -> dict | None: ...

    def read_ahead(self, key: Key, flow) -> bool: ...

    def settle(self, layer: int, experts: Sequence[int], resident: Callable[[Key], bool], flow) -> None: ...


class SlotSource:
    """Every missing expert is read into a slot: compute gets the slot's tensors."""

    needs_slots = True

    def view(self, layer: int, expert: int) -> None:
        return None

    def read_ahead(self, key: Key, flow) -> bool:
        return False

    def settle(self, layer: int, experts: Sequence[int], resident: Callable[[Key], bool], flow) -> None:
        pass


class MappedSource:
    """``io="mmap"`` on CPU: a missing expert is computed in place from views of the mapped ``store``.

    Experts that cannot be viewed (another dtype, a transposed layout, a file that cannot be mapped)
    are read into slots as with the other sources.
    """

    needs_slots = False

    def __init__(self, store, dtype: torch.dtype):
        self.store = store
        self.dtype = dtype
        self._advised: set[Key] = set()  # prefetched: the kernel was asked to read them ahead

    def view(self, layer: int, expert: int) -> dict | None:
        """The expert's tensors in the mapping, the kernel asked to read them now; raises CheckpointError if
        its file changed on disk since load (truncated, replaced, removed)."""
        weights = self.store.mapped(layer, expert, self.dtype)
        if weights is not None and (layer, expert) not in self._advised:  # a prefetch asked for it already
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

    def settle(self, layer: int, experts: Sequence[int], resident: Callable[[Key], bool], flow) -> None:
        """Score the read-ahead advice given for ``layer``, which runs now with ``experts``."""
        if not self._advised:
            return
        wanted = set(experts)
        for key in [k for k in self._advised if k[0] == layer]:
            self._advised.discard(key)
            if key[1] not in wanted:
                flow.prefetch_wasted += 1
                continue
            flow.prefetch_used += 1
            if not resident(key):
                flow.mapped_ahead += 1


def make_source(store, device: torch.device, dtype: torch.dtype) -> Source:
    """The source for a store opened with ``io`` and slots on ``device``."""
    if getattr(store, "maps", None) is not None and device.type == "cpu":
        return MappedSource(store, dtype)
    return SlotSource()
