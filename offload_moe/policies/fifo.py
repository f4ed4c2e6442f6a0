"""First in, first out: evict the key that became resident earliest; requests do not reorder."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from ..errors import PolicyError
from .base import EvictionPolicy, Key


class FIFO(EvictionPolicy):
    """Evicts the resident key inserted earliest, whatever was requested since."""

    name = "fifo"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest insertion first

    def on_insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_evict(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, pinned: Container[Key]) -> Key:
        for key in self._order:
            if key not in pinned:
                return key
        raise PolicyError("fifo: victim() found no evictable resident key; call it only when one is unpinned")
