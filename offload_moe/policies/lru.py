"""Least recently used: evict the key whose last request is oldest."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..errors import PolicyError
from .base import EvictionPolicy, Key


class LRU(EvictionPolicy):
    """Evicts the least recently requested resident key; every operation is O(1) when that key is unpinned."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def on_access(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_evict(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key:
        # Pinned keys were just requested, so they sit at the recent end: the scan stops early.
        for key in self._order:
            if evictable(key):
                return key
        raise PolicyError("lru: victim() found no evictable resident key; call it only when one is unpinned")
