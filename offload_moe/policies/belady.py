"""Belady's optimal eviction (MIN): evict the key whose next use is farthest away.

It needs the whole future, so it only exists for profiling: replaying a
recorded routing trace gives the lowest miss count any policy could reach.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence

from ..errors import PolicyError
from .base import EvictionPolicy, Key

_Entry = tuple[float, int, Key]  # (-next use, push order, key)


class Belady(EvictionPolicy):
    """Evicts the resident key requested again farthest in ``future`` (never again counts as infinity).

    ``future`` must be exactly the keys ``on_access`` will receive, in order;
    any divergence raises ``PolicyError``. A max-heap on next use with lazy
    invalidation makes ``victim`` O(log n) amortised.
    """

    name = "belady"

    def __init__(self, future: Sequence[Key]) -> None:
        self.future = future
        self.cursor = 0  # position of the next expected access
        self._next_after = _next_positions(future)
        self._next_use: dict[Key, float] = {}
        self._resident: set[Key] = set()
        self._heap: list[_Entry] = []
        self._order = itertools.count()  # keeps entries comparable without comparing keys

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
        self._next_use[key] = self._next_after[position]
        if key in self._resident:
            self._push(key)

    def on_insert(self, key: Key) -> None:
        self._next_use.setdefault(key, math.inf)  # only if inserted without a request, outside the call order
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
            if evictable(entry[2]):
                self._restore(kept)
                return entry[2]
        self._restore(kept)
        raise PolicyError("belady: victim() found no evictable resident key; call it only when one is unpinned")

    def _is_current(self, entry: _Entry) -> bool:
        neg_next, _, key = entry
        return key in self._resident and -neg_next == self._next_use[key]

    def _restore(self, entries: list[_Entry]) -> None:
        for entry in entries:
            heapq.heappush(self._heap, entry)

    def _push(self, key: Key) -> None:
        heapq.heappush(self._heap, (-self._next_use[key], next(self._order), key))
        # Hits push without popping; rebuild once stale entries dominate so memory stays O(resident).
        if len(self._heap) > 2 * len(self._resident) + 32:
            self._heap = [(-self._next_use[k], next(self._order), k) for k in self._resident]
            heapq.heapify(self._heap)


def _next_positions(future: Sequence[Key]) -> list[float]:
    """For each position i, the next position holding the same key as i, or infinity."""
    following: list[float] = [math.inf] * len(future)
    seen: dict[Key, int] = {}
    for i in range(len(future) - 1, -1, -1):
        following[i] = seen.get(future[i], math.inf)
        seen[future[i]] = i
    return following
