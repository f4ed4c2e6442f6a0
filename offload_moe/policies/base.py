"""The eviction-policy interface.

A policy keeps an ordering of the keys it has been told about and answers one
question: which resident key goes. It never touches tensors and never knows
about slots; the cache (``offload_moe.cache.Residency``) tells it what happens.

Call order the cache guarantees, for every request of a key:

- ``on_access(key)``: always, hit or miss, in request order;
- on a miss with a full cache: ``victim(pinned)`` then ``on_evict(victim)``;
- on a miss: ``on_insert(key)`` once the key is resident.

``on_evict`` is also called when the cache drops a key for another reason. Before each forward step,
``on_tokens(tokens)`` names the step's token ids (one row), or None where they are not known; a policy
that reads them overrides it (``token-forecast``), the others never see it.
The keys a policy has been told about (inserted, not evicted) are exactly the resident ones. A policy
never calls the cache: ``victim`` is handed the set of pinned keys, the ones it may not choose.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from abc import ABC, abstractmethod
from collections.abc import Container, Hashable, Sequence
from typing import ClassVar

Key = Hashable  # in the runtime: (layer, expert)


class EvictionPolicy(ABC):
    """Base class of eviction policies. Subclasses set ``name`` and implement ``victim``."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        victim = cls.__dict__.get("victim")
        if victim is not None and list(inspect.signature(victim).parameters)[1:2] == ["evictable"]:
            cls.victim = _from_evictable(cls, victim)

    def on_access(self, key: Key) -> None:
        """A request for ``key`` was made (hit or miss)."""

    def on_insert(self, key: Key) -> None:
        """``key`` became resident."""

    def on_evict(self, key: Key) -> None:
        """``key`` is no longer resident."""

    def on_tokens(self, tokens: Sequence[int] | None) -> None:
        """A forward step of the token ids ``tokens`` (one sequence's row) starts; None: a step whose ids are not
        known, or of several rows."""

    @abstractmethod
    def victim(self, pinned: Container[Key]) -> Key:
        """Return the resident key to evict, never one in ``pinned`` (in use by the layer being computed, or loading).

        The cache only calls this when at least one resident key is not pinned.
        """


def reads_tokens(policy: EvictionPolicy | type[EvictionPolicy]) -> bool:
    """Whether ``policy`` (or the policy class) overrides ``on_tokens``: only then are a step's token ids worked out
    for it."""
    cls = policy if isinstance(policy, type) else type(policy)
    return cls.on_tokens is not EvictionPolicy.on_tokens


def _from_evictable(cls: type, victim):
    """A policy written for the old interface, ``victim(evictable)`` with ``evictable(key) -> bool``, keeps working."""
    warnings.warn(f"eviction policy {cls.__name__}: victim(self, evictable) is the old interface; write "
                  "victim(self, pinned), where pinned holds the keys it may not choose (see "
                  "offload_moe/policies/base.py)", DeprecationWarning, stacklevel=3)

    @functools.wraps(victim)
    def adapted(self, pinned: Container[Key]) -> Key:
        return victim(self, lambda key: key not in pinned)

    return adapted
