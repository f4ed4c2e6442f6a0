"""Least recently used: evict the key whose last request is oldest."""

from __future__ import annotations

from .base import Key
from .fifo import FIFO


class LRU(FIFO):
    """Evicts the least recently requested resident key: FIFO order, refreshed on every request.

    Pinned keys were just requested, so they sit at the recent end and the scan in ``victim`` stops early.
    """

    name = "lru"

    def on_access(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)
