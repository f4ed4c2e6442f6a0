"""A min-heap over resident keys whose priorities change, for policies that rank keys (LFU, Belady)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Container, Mapping

from ..errors import PolicyError
from .base import Key

_Entry = tuple[tuple, int, Key]  # (priority, when the key was added, key)


class LazyHeap:
    """Resident keys ordered by their current priority ``rank[key]``, lowest first.

    ``rank`` is the owning policy's own mapping, which it keeps current; the heap only reads it, so it
    never calls back into the policy.

    A key is pushed again whenever its priority changes (or, with ``rising``, when an out-of-date
    entry reaches the top); entries whose priority is out of date, or whose key left, are dropped
    when they reach the top, so ``lowest_unpinned`` is O(log n) amortised. Equal priorities go to the
    key added earliest (its latest ``add``): a rule of the keys alone, not of the heap's history, so the
    compiled replay (``profiling.compiled``) can follow it, and entries stay comparable without comparing keys.
    """

    def __init__(self, rank: Mapping[Key, tuple], owner: str, *, rising: bool = False):
        self.rank = rank
        self.owner = owner
        # rising: priorities only ever grow (LFU's counts), so the owner need not push on every
        # change; an entry found out of date at the top is pushed again with its current priority.
        self.rising = rising
        self.resident: dict[Key, int] = {}  # resident key -> when it was added: the tie-break
        self._heap: list[_Entry] = []
        self._order = itertools.count()

    def add(self, key: Key) -> None:
        self.resident[key] = next(self._order)
        self.push(key)

    def discard(self, key: Key) -> None:
        self.resident.pop(key, None)

    def push(self, key: Key) -> None:
        heapq.heappush(self._heap, (self.rank[key], self.resident[key], key))
        # Hits push without popping; rebuild once stale entries dominate so memory stays O(resident).
        if len(self._heap) > 2 * len(self.resident) + 32:
            self._heap = [(self.rank[k], added, k) for k, added in self.resident.items()]
            heapq.heapify(self._heap)

    def lowest_unpinned(self, pinned: Container[Key]) -> Key:
        """The resident key of lowest priority not in ``pinned``; it stays in the heap until ``discard``."""
        key = self.first_unpinned(pinned)
        if key is None:
            raise PolicyError(f"{self.owner}: victim() found no evictable resident key; call it only when one is unpinned")
        return key

    def first_unpinned(self, pinned: Container[Key]) -> Key | None:
        """``lowest_unpinned``, or None when every resident key is pinned."""
        kept: list[_Entry] = []  # current entries popped on the way; they go back
        try:
            while self._heap:
                entry = heapq.heappop(self._heap)
                priority, added, key = entry
                if self.resident.get(key) != added:  # the key left (and may be back, with an entry of its own)
                    continue
                current = self.rank[key]
                if priority != current:
                    if self.rising:
                        heapq.heappush(self._heap, (current, added, key))
                    continue
                kept.append(entry)
                if key not in pinned:
                    return key
        finally:
            for entry in kept:
                heapq.heappush(self._heap, entry)
        return None

    def __len__(self) -> int:
        return len(self._heap)
