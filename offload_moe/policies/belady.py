"""Belady's optimal eviction (MIN): evict the key whose next use is farthest away.

It needs the whole future, so it only exists for profiling: replaying a
recorded routing trace gives the lowest miss count any policy could reach.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence

from ..errors import PolicyError
from .base import EvictionPolicy, Key
from .heap import LazyHeap

class Belady(EvictionPolicy):
    """Evicts the resident key requested again farthest in ``future`` (never again counts as infinity).

    ``future`` must be exactly the keys ``on_access`` will receive, in order;
    any divergence raises ``PolicyError``. A heap on next use makes ``victim`` O(log n) amortised.
    ``next_after``: for each position of ``future``, the next position of the same key (infinity: none), when
    the caller has it already; a replay in pieces hands windows onto both that hold one piece at a time.
    """

    name = "belady"

    def __init__(self, future: Sequence[Key], next_after: Sequence[float] | None = None) -> None:
        self.future = future
        self.cursor = 0  # position of the next expected access
        self._next_after = _next_positions(future) if next_after is None else next_after
        self._rank: dict[Key, tuple[float]] = {}  # key -> (minus its next use,): farthest next use first
        self._heap = LazyHeap(self._rank, self.name)

    def on_access(self, key: Key) -> None:
        position = self.cursor
        if position >= len(self.future):
            raise PolicyError(
                f"belady: access {position} received {key!r} but the future given has only "
                f"{len(self.future)} accesses (expected none); the trace given to Belady must be the one being replayed"
            )
        expected = self.future[position]
        if key != expected:
            raise PolicyError(
                f"belady: access {position} expected {expected!r} but received {key!r}; "
                "the trace given to Belady must be the one being replayed"
            )
        self.cursor += 1
        self._rank[key] = (-self._next_after[position],)
        if key in self._heap.resident:
            self._heap.push(key)

    def on_insert(self, key: Key) -> None:
        self._rank.setdefault(key, (-math.inf,))  # only if inserted without a request, outside the call order
        self._heap.add(key)

    def on_evict(self, key: Key) -> None:
        self._heap.discard(key)

    def victim(self, pinned: Container[Key]) -> Key:
        return self._heap.lowest_unpinned(pinned)


def _next_positions(future: Sequence[Key]) -> list[float]:
    """For each position i, the next position holding the same key as i, or infinity."""
    following: list[float] = [math.inf] * len(future)
    seen: dict[Key, int] = {}
    for i in range(len(future) - 1, -1, -1):
        following[i] = seen.get(future[i], math.inf)
        seen[future[i]] = i
    return following
