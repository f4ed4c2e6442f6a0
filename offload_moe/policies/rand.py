"""Uniform random eviction: the baseline every other policy should beat."""

from __future__ import annotations

import random
from collections.abc import Container

from ..errors import PolicyError
from .base import EvictionPolicy, Key

_TRIES = 8  # random picks before scanning; with at most a layer's experts pinned, a pick rarely misses


class Random(EvictionPolicy):
    """Evicts a resident key chosen uniformly among the evictable ones, from its own generator seeded by ``seed``."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._keys: list[Key] = []
        self._index: dict[Key, int] = {}

    def on_insert(self, key: Key) -> None:
        if key not in self._index:
            self._index[key] = len(self._keys)
            self._keys.append(key)

    def on_evict(self, key: Key) -> None:
        i = self._index.pop(key, None)
        if i is None:
            return
        last = self._keys.pop()
        if i < len(self._keys):  # move the last key into the hole
            self._keys[i] = last
            self._index[last] = i

    def victim(self, pinned: Container[Key]) -> Key:
        for _ in range(_TRIES if self._keys else 0):
            key = self._keys[self._rng.randrange(len(self._keys))]
            if key not in pinned:
                return key
        candidates = [k for k in self._keys if k not in pinned]
        if not candidates:
            raise PolicyError("random: victim() found no evictable resident key; call it only when one is unpinned")
        return self._rng.choice(candidates)
