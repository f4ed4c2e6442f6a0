"""The expert cache: a fixed pool of device slots, who sits where, and counters.

Two layers, so that profiling can replay traces without tensors:

- ``Residency`` is pure bookkeeping: which (layer, expert) key owns which slot,
  which keys are pinned (in use by the layer being computed), and the hit,
  miss and eviction counters. It asks an ``EvictionPolicy`` which key goes and
  never knows which policy it runs.
- ``SlotPool`` is the memory: one buffer allocated once on the device, each
  slot holding one expert's tensors as views.

``ExpertCache`` joins the two with an ``ExpertStore``: on a miss it picks a
slot through ``Residency`` and asks the store to fill the slot's views.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import BudgetError, ExpertLoadError
from .policies.base import EvictionPolicy

if TYPE_CHECKING:
    from .store import ExpertStore
    from .transfer import Mover

Key = tuple[int, int]  # (layer, expert)


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_failures: int = 0
    load_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes_loaded": self.bytes_loaded,
            "load_failures": self.load_failures,
            "load_seconds": self.load_seconds,
        }

    def add(self, other: "Counters") -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.evictions += other.evictions
        self.bytes_loaded += other.bytes_loaded
        self.load_failures += other.load_failures
        self.load_seconds += other.load_seconds


class Residency:
    """Slot ownership, pins and counters for a cache of ``capacity`` slots, driven by ``policy``.

    Invariants (checked by ``check()`` and the property tests):
    resident keys never exceed capacity; a pinned key is never evicted;
    hits + misses equals the number of requests.
    """

    def __init__(self, capacity: int, policy: EvictionPolicy):
        if capacity < 1:
            raise BudgetError(f"an expert cache needs at least 1 slot, got capacity={capacity}")
        self.capacity = capacity
        self.policy = policy
        self.slot_of: dict[Key, int] = {}
        self.owner: list[Key | None] = [None] * capacity
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self.pins: dict[Key, int] = defaultdict(int)
        self.per_layer: dict[int, Counters] = defaultdict(Counters)

    # -- queries -------------------------------------------------------------
    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def is_pinned(self, key: Key) -> bool:
        return self.pins.get(key, 0) > 0

    def totals(self) -> Counters:
        total = Counters()
        for c in self.per_layer.values():
            total.add(c)
        return total

    # -- transitions ---------------------------------------------------------
    def request(self, keys: Iterable[Key]) -> tuple[list[tuple[Key, int]], list[Key]]:
        """Record a request for each key; pin and return the hits with their slots, and the misses."""
        hits: list[tuple[Key, int]] = []
        misses: list[Key] = []
        for key in keys:
            self.policy.on_access(key)
            slot = self.slot_of.get(key)
            if slot is None:
                self.per_layer[key[0]].misses += 1
                misses.append(key)
            else:
                self.per_layer[key[0]].hits += 1
                self.pins[key] += 1
                hits.append((key, slot))
        return hits, misses

    def admit(self, key: Key) -> tuple[int, Key | None]:
        """Give ``key`` a slot, evicting an unpinned key if none is free. The key comes back pinned."""
        if key in self.slot_of:
            raise AssertionError(f"{key} is already resident")
        evicted = None
        if self.free:
            slot = self.free.pop()
        else:
            if len(self.pins) >= len(self.slot_of):  # every resident key is pinned
                raise BudgetError(
                    f"all {self.capacity} expert slots are in use by the layer being computed; "
                    "raise cache_experts / cache_memory"
                )
            evicted = self.policy.victim(lambda k: k in self.slot_of and not self.is_pinned(k))
            if evicted not in self.slot_of or self.is_pinned(evicted):
                raise AssertionError(f"policy {self.policy.name} chose {evicted}, which is not evictable")
            slot = self.slot_of.pop(evicted)
            self.policy.on_evict(evicted)
            self.per_layer[evicted[0]].evictions += 1
        self.slot_of[key] = slot
        self.owner[slot] = key
        self.pins[key] += 1
        self.policy.on_insert(key)
        return slot, evicted

    def discard(self, key: Key) -> None:
        """Drop ``key`` (a load failed): its slot becomes free and nothing can hit on it."""
        slot = self.slot_of.pop(key, None)
        if slot is None:
            return
        self.owner[slot] = None
        self.free.append(slot)
        self.pins.pop(key, None)
        self.policy.on_evict(key)

    def release(self, key: Key) -> None:
        """Unpin ``key``: the layer no longer needs it."""
        n = self.pins.get(key, 0)
        if n <= 1:
            self.pins.pop(key, None)
        else:
            self.pins[key] = n - 1

    def check(self) -> None:
        """Raise AssertionError if an invariant does not hold."""
        assert len(self.slot_of) <= self.capacity
        assert len(self.slot_of) + len(self.free) == self.capacity
        for key, slot in self.slot_of.items():
            assert self.owner[slot] == key
        assert all(self.owner[s] is None for s in self.free)
        assert all(k in self.slot_of for k, n in self.pins.items() if n > 0)


def simulate(accesses: Sequence[Key], policy: EvictionPolicy, capacity: int) -> Counters:
    """Replay single-key requests through a cache of ``capacity`` slots; return its counters.

    Each access pins only its own key while it is served, so this is the classic
    demand-paging setting in which Belady's optimum is exact.
    """
    table = Residency(capacity, policy)
    for key in accesses:
        hits, misses = table.request([key])
        if misses:
            table.admit(key)
        table.release(key)
    return table.totals()


@dataclass(frozen=True)
class SlotLayout:
    """Shapes of one expert's tensors as the experts module holds them (leading expert dim removed)."""

    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return sum(_aligned(_prod(s)) for s in self.shapes.values())

    @property
    def nbytes(self) -> int:
        return sum(_prod(s) for s in self.shapes.values()) * _itemsize(self.dtype)


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _aligned(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SlotPool:
    """``capacity`` expert slots in one buffer on ``device``; ``views(slot)`` gives a slot's tensors."""

    def __init__(self, capacity: int, layout: SlotLayout, device: torch.device):
        self.capacity = capacity
        self.layout = layout
        self.device = device
        try:
            self.buffer = torch.empty(capacity * layout.numel, dtype=layout.dtype, device=device)
        except torch.OutOfMemoryError as e:
            raise BudgetError(
                f"could not allocate {capacity} expert slots ({capacity * layout.nbytes / 2**30:.2f} GiB) "
                f"on {device}: {e}. Lower cache_experts / cache_memory."
            ) from None
        self._views: list[dict[str, torch.Tensor]] = []
        for slot in range(capacity):
            offset = slot * layout.numel
            views = {}
            for name, shape in layout.shapes.items():
                n = _prod(shape)
                views[name] = self.buffer[offset : offset + n].view(shape)
                offset += _aligned(n)
            self._views.append(views)

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        return self._views[slot]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


@dataclass
class ExpertCache:
    """The hot tier: ``Residency`` bookkeeping over a ``SlotPool``, filled from an ``ExpertStore``."""

    residency: Residency
    pool: SlotPool
    store: "ExpertStore"
    mover: "Mover"
    layer_names: dict[int, str] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.residency.capacity

    def acquire(self, layer: int, experts: Sequence[int]) -> tuple[list[tuple[int, int]], list[int]]:
        """Pin the resident experts of ``experts``; return [(expert, slot)] for them and the missing experts."""
        hits, misses = self.residency.request((layer, e) for e in experts)
        return [(k[1], slot) for k, slot in hits], [k[1] for k in misses]

    def load(self, layer: int, expert: int) -> int:
        """Bring a missing expert into a slot (evicting per policy); returns the slot, pinned."""
        key = (layer, expert)
        slot, _ = self.residency.admit(key)
        start = time.perf_counter()
        try:
            nbytes = self.mover.fill(self.store, layer, expert, self.pool.views(slot))
        except BaseException as e:
            self.residency.discard(key)
            self.residency.per_layer[layer].load_failures += 1
            if isinstance(e, ExpertLoadError) or not isinstance(e, Exception):
                raise
            raise ExpertLoadError(
                f"loading expert {expert} of layer {layer} ({self.layer_names.get(layer, '?')}) "
                f"from {self.store.describe(layer, expert)} failed: {e}"
            ) from e
        counters = self.residency.per_layer[layer]
        counters.bytes_loaded += nbytes
        counters.load_seconds += time.perf_counter() - start
        return slot

    def release(self, layer: int, expert: int) -> None:
        self.residency.release((layer, expert))

    def stats(self) -> dict:
        total = self.residency.totals()
        return {
            **total.as_dict(),
            "capacity_experts": self.capacity,
            "resident_experts": len(self.residency),
            "resident_bytes": self.pool.nbytes,
            "expert_bytes": self.pool.layout.nbytes,
            "policy": self.residency.policy.name,
            "per_layer": {layer: c.as_dict() for layer, c in sorted(self.residency.per_layer.items())},
        }
