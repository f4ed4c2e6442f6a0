"""Least frequently used, with request counts kept across evictions (MoE-Infinity's visit counts)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Container

from .base import EvictionPolicy, Key
from .heap import LazyHeap


class LFU(EvictionPolicy):
    """Evicts the resident key requested least often since start; ties go to the least recently requested."""

    name = "lfu"

    def __init__(self) -> None:
        self.counts: Counter[Key] = Counter()
        self._tick = 0
        self._rank: dict[Key, tuple[int, int]] = {}  # key -> (requests, last request)
        # (count, last request) only grows, so a request need not touch the heap
        self._heap = LazyHeap(self._rank, self.name, rising=True)

    def on_access(self, key: Key) -> None:
        self.counts[key] += 1
        self._tick += 1
        self._rank[key] = (self.counts[key], self._tick)

    def on_insert(self, key: Key) -> None:
        self._rank.setdefault(key, (0, 0))  # inserted without a request, outside the call order
        self._heap.add(key)

    def on_evict(self, key: Key) -> None:
        self._heap.discard(key)

    def victim(self, pinned: Container[Key]) -> Key:
        return self._heap.lowest_unpinned(pinned)
