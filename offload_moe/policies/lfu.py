"""Least frequently used, with request counts kept across evictions (MoE-Infinity's visit counts)."""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable

from ..errors import PolicyError
from .base import EvictionPolicy, Key

_Entry = tuple[int, int, int, Key]  # (count, last access tick, push order, key)


class LFU(EvictionPolicy):
    """Evicts the resident key requested least often since start; ties go to the least recently requested.

    A min-heap holds one entry per (key, count) seen while resident. Entries whose
    count or tick is out of date, or whose key left the cache, are dropped when
    they reach the top, so ``victim`` is O(log n) amortised.
    """

    name = "lfu"

    def __init__(self) -> None:
        self.counts: Counter[Key] = Counter()
        self._last: dict[Key, int] = {}
        self._tick = 0
        self._resident: set[Key] = set()
        self._heap: list[_Entry] = []
        self._order = itertools.count()  # keeps entries comparable without comparing keys

    def on_access(self, key: Key) -> None:
        self.counts[key] += 1
        self._tick += 1
        self._last[key] = self._tick
        if key in self._resident:
            self._push(key)

    def on_insert(self, key: Key) -> None:
        self._last.setdefault(key, 0)
        self._resident.add(key)
        self._push(key)

    def on_evict(self, key: Key) -> None:
        self._resident.discard(key)

    def victim(self, evictable: Callable[[Key], bool]) -> Key:
        kept: list[_Entry] = []  # current entries popped on the way; they go back
        while self._heap:
            entry = heapq.heappop(self._heap)
            if not self._is_current(entry):
                continue
            kept.append(entry)
            if evictable(entry[3]):
                self._restore(kept)
                return entry[3]
        self._restore(kept)
        raise PolicyError("lfu: victim() found no evictable resident key; call it only when one is unpinned")

    def _is_current(self, entry: _Entry) -> bool:
        count, tick, _, key = entry
        return key in self._resident and count == self.counts[key] and tick == self._last[key]

    def _restore(self, entries: list[_Entry]) -> None:
        for entry in entries:
            heapq.heappush(self._heap, entry)

    def _push(self, key: Key) -> None:
        heapq.heappush(self._heap, (self.counts[key], self._last[key], next(self._order), key))
        # Hits push without popping; rebuild once stale entries dominate so memory stays O(resident).
        if len(self._heap) > 2 * len(self._resident) + 32:
            self._heap = [(self.counts[k], self._last[k], next(self._order), k) for k in self._resident]
            heapq.heapify(self._heap)
