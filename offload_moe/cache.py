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

import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from .errors import BudgetError, CheckpointError, ExpertLoadError, ModelClosedError
from .formats import DENSE, ExpertFormat
from .pinned import PinnedMemory
from .policies.base import EvictionPolicy
from .sources import make_source

if TYPE_CHECKING:
    from .store import ExpertStore
    from .transfer import Mover, Ticket

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
        self.quarantined: set[int] = set()  # slots a timed-out read may still write into
        self.pins: dict[Key, int] = defaultdict(int)  # key -> pins (1 or more); an unpinned key has no entry
        self.per_layer: dict[int, Counters] = defaultdict(Counters)

    # -- queries -------------------------------------------------------------
    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def is_pinned(self, key: Key) -> bool:
        return self.pins.get(key, 0) > 0

    def full(self) -> bool:
        """No slot is free and every resident key is pinned: nothing can be admitted now."""
        return not self.free and len(self.pins) >= len(self.slot_of)

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
        on_access, slot_of, pins, per_layer = self.policy.on_access, self.slot_of, self.pins, self.per_layer  # hot path
        for key in keys:
            on_access(key)
            slot = slot_of.get(key)
            if slot is None:
                per_layer[key[0]].misses += 1
                misses.append(key)
            else:
                per_layer[key[0]].hits += 1
                pins[key] += 1
                hits.append((key, slot))
        return hits, misses

    def admit(self, key: Key, recycle: bool = False) -> tuple[int, Key | None]:
        """Give ``key`` a slot, evicting an unpinned key if none is free. The key comes back pinned.

        ``recycle``: the victim is one of the unpinned keys of ``key``'s own layer, if it has any (the policy
        chooses which); the keys of other layers are then off limits to it, as pinned ones are.
        """
        if key in self.slot_of:
            raise AssertionError(f"{key} is already resident")
        evicted = None
        if self.free:
            slot = self.free.pop()
        else:
            if self.full():
                raise BudgetError(
                    f"all {self.capacity} expert slots are in use by the layer being computed; "
                    "raise cache_experts / cache_memory"
                )
            kept = self.pins
            if recycle and any(k[0] == key[0] and k not in kept for k in self.slot_of):
                kept = _PinnedOrOtherLayer(self.pins, key[0])
            evicted = self.policy.victim(kept)  # the policy's keys are the resident ones
            if evicted not in self.slot_of or evicted in kept:
                raise AssertionError(f"policy {self.policy.name} chose {evicted}, which is not evictable")
            slot = self.slot_of.pop(evicted)
            self.policy.on_evict(evicted)
            self.per_layer[evicted[0]].evictions += 1
        self.slot_of[key] = slot
        self.owner[slot] = key
        self.pins[key] += 1
        self.policy.on_insert(key)
        return slot, evicted

    def discard(self, key: Key, quarantine: bool = False) -> int | None:
        """Drop ``key`` (a load failed): nothing can hit on it any more. Returns its slot.

        With ``quarantine`` the slot is withheld from reuse until ``unquarantine(slot)``: a read
        that timed out may still write into it later.
        """
        slot = self.slot_of.pop(key, None)
        if slot is None:
            return None
        self.owner[slot] = None
        if quarantine:
            self.quarantined.add(slot)
        else:
            self.free.append(slot)
        self.pins.pop(key, None)
        self.policy.on_evict(key)
        return slot

    def unquarantine(self, slot: int) -> None:
        self.quarantined.discard(slot)
        self.free.append(slot)

    def release_all(self, keys: Iterable[Key]) -> None:
        """Unpin each of ``keys`` once."""
        pins = self.pins
        for key in keys:
            n = pins.get(key, 0)
            if n <= 1:
                pins.pop(key, None)
            else:
                pins[key] = n - 1

    def release(self, key: Key) -> None:
        """Unpin ``key``: the layer no longer needs it."""
        self.release_all((key,))

    def check(self) -> None:
        """Raise AssertionError if an invariant does not hold."""
        assert len(self.slot_of) <= self.capacity
        assert len(self.slot_of) + len(self.free) + len(self.quarantined) == self.capacity
        for key, slot in self.slot_of.items():
            assert self.owner[slot] == key
        assert all(self.owner[s] is None for s in self.free) and not self.quarantined & set(self.free)
        assert all(k in self.slot_of for k, n in self.pins.items() if n > 0)


class _PinnedOrOtherLayer:
    """What a victim may not be when a layer recycles its own slots: a pinned key, or a key of another layer."""

    __slots__ = ("pins", "layer")

    def __init__(self, pins: dict[Key, int], layer: int):
        self.pins, self.layer = pins, layer

    def __contains__(self, key: Key) -> bool:
        return key[0] != self.layer or key in self.pins


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
    """Shapes of one expert's tensors as a slot holds them (leading expert dimension removed).

    Every tensor is in the compute ``dtype`` except the ``packed`` ones, which keep the dtype the checkpoint
    stores them in (quantized weights and their scales, ``offload_moe.formats``); ``format`` turns a slot's
    tensors into the weights the experts compute with. ``nbytes`` counts the bytes one expert moves.
    """

    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    packed: dict[str, torch.dtype] = field(default_factory=dict)
    format: ExpertFormat = DENSE

    @classmethod
    def of_store(cls, store: "ExpertStore", dtype: torch.dtype) -> "SlotLayout":
        """The slots of ``store``'s experts: its slot tensors in ``dtype``, packed ones as the checkpoint stores them."""
        shapes = store.slot_tensors()
        return cls(shapes, dtype, {n: d for n, d in store.packed.items() if n in shapes}, store.format)

    def dtype_of(self, name: str) -> torch.dtype:
        return self.packed.get(name, self.dtype)

    @cached_property
    def offsets(self) -> dict[str, int]:
        """Byte offset of each tensor in a slot, each aligned to 64 elements of the compute dtype."""
        align, offset, out = 64 * self.dtype.itemsize, 0, {}
        for name, shape in self.shapes.items():
            out[name] = offset
            offset += _aligned(_prod(shape) * self.dtype_of(name).itemsize, align)
        out[""] = offset  # the slot's size
        return out

    @cached_property
    def slot_bytes(self) -> int:
        return self.offsets[""]

    @cached_property
    def numel(self) -> int:
        """A slot's size in elements of the compute dtype."""
        return self.slot_bytes // self.dtype.itemsize

    @cached_property
    def nbytes(self) -> int:  # read at every load that lands: computed once
        return sum(_prod(s) * self.dtype_of(n).itemsize for n, s in self.shapes.items())

    @property
    def format_name(self) -> str:
        """What one expert is stored as: the compute dtype, or the packed format's name."""
        return self.format.name if self.packed else str(self.dtype).removeprefix("torch.")


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _aligned(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


class SlotPool:
    """``capacity`` expert slots in one buffer on ``device``; ``views(slot)`` gives a slot's tensors.

    ``pin`` (host pools): lock the buffer for copies to a GPU, the one named if it is a ``torch.device``.
    """

    def __init__(self, capacity: int, layout: SlotLayout, device: torch.device, pin: bool | torch.device = False):
        self.capacity = capacity
        self.layout = layout
        self.device = device
        what = "pinned host" if pin else str(device)
        self._pinned = None
        size = capacity * layout.slot_bytes
        try:
            if pin:  # exactly the budget: torch's pin_memory=True would round it up to a power of two
                self._pinned = PinnedMemory(size, f"{capacity} host expert slots",
                                            device=pin if isinstance(pin, torch.device) else None)
                self.buffer = self._pinned.tensor
            else:
                self.buffer = torch.empty(size, dtype=torch.uint8, device=device)  # bytes: tensors of several dtypes
        except (torch.OutOfMemoryError, RuntimeError) as e:
            raise BudgetError(
                f"could not allocate {capacity} expert slots ({capacity * layout.nbytes / 2**30:.2f} GiB) "
                f"in {what} memory: {str(e).splitlines()[0]}. Lower the budget (cache_experts / cache_memory / "
                "host_memory)."
            ) from None
        self._views: list[dict[str, torch.Tensor]] = []
        self._weights: list[dict] = []
        for slot in range(capacity):
            base = slot * layout.slot_bytes
            views = {}
            for name, shape in layout.shapes.items():
                start = base + layout.offsets[name]
                dtype = layout.dtype_of(name)
                views[name] = self.buffer[start : start + _prod(shape) * dtype.itemsize].view(dtype).view(shape)
            self._views.append(views)
            self._weights.append(layout.format.weights(views))

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        """A slot's tensors, to be written (packed weights as they are stored)."""
        return self._views[slot]

    def weights(self, slot: int) -> dict:
        """A slot's tensors as the experts compute with them (``views`` through the layout's format)."""
        return self._weights[slot]

    def flat(self, slot: int) -> torch.Tensor:
        """A slot's whole memory as bytes: host and device pools share a layout, so a move is one copy."""
        return self.buffer[slot * self.layout.slot_bytes : (slot + 1) * self.layout.slot_bytes]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def release(self) -> None:
        """Unlock pinned slots (the model is closing and no copy reads them any more)."""
        if self._pinned is not None:
            self._pinned.release()




@dataclass
class HostTier:
    """The warm tier: expert slots in (pinned, on CUDA) host RAM, with their own residency and policy."""

    residency: Residency
    pool: SlotPool


@dataclass
class FlowCounters:
    """What moved between tiers and how long compute waited, since the last reset."""

    inflight_hits: int = 0  # needed experts that a prefetch had already started
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched experts requested before they were evicted
    prefetch_wasted: int = 0  # prefetched experts evicted unused
    prefetch_cancelled: int = 0  # prefetches whose read was called off before it started (their layer ran without
    # them) and that no layer has asked for since: bytes never read
    prefetch_failures: int = 0
    mapped: int = 0  # missing experts computed in place from the mapped checkpoint (io="mmap")
    mapped_bytes: int = 0
    mapped_ahead: int = 0  # of those, ones a prefetch had asked the kernel to read ahead
    disk_bytes: int = 0
    disk_seconds: float = 0.0
    copy_bytes: int = 0  # host slot -> device slot
    copy_seconds: float = 0.0
    stall_seconds: float = 0.0  # host time blocked waiting for an expert
    tokens: int = 0
    gpu_stall_base: float = 0.0  # the mover's running GPU totals at the last reset
    gpu_copy_base: float = 0.0


class ExpertCache:
    """The hot tier: device slots filled from the warm tier (if any) or the disk, loads in flight tracked.

    Compute makes one call, ``use(layer, experts)``, which pins, loads and hands out the experts,
    starts the loads the prefetcher named (``Lease.prefetch``) and unpins the experts when its block ends.
    The load at startup is ``fill`` (device slots) or ``fill_host`` (the warm tier); ``prefetch`` starts
    loads between layers.

    Every bookkeeping step runs on the calling (compute) thread; reader threads only move bytes.
    ``lock`` (reentrant) is held by whoever uses the cache, for a whole layer's use (taken once, by the
    lease), a prefetch or ``close``: several threads may run a model, one layer at a time.
    After ``close`` every use raises ``ModelClosedError``.

    The bookkeeping (what is resident, which slot goes, whether a prefetch is issued, used or wasted)
    depends only on the sequence of calls, never on when a read lands, so a replay with a mover that
    moves nothing counts what the live cache counts. A key in flight holds a slot and counts as
    resident, so a layer that needs it waits for it rather than loading it twice. A load holds a
    pin (its flight pin) from its start until the layer that needs it reaches it, or the next layer
    starts, whichever comes first: a logical event, not its landing. A slot whose read is still
    moving bytes when its key is evicted is waited for before it is reused (time, never a count),
    and a prefetch whose read had not started when its layer ran without it is called off but stays
    resident in the books: a layer that later asks for it starts its read then. A prefetch never
    evicts a pinned key, so it never takes an expert the current layer still needs. Where an
    expert's tensors come from when it has no slot is the ``source``'s business
    (``offload_moe.sources``; None: every missing expert is read into a slot). A step of several tokens
    that asks for more experts than the slots hold (a batch, a prompt) streams the excess through its own
    layer's slots (``Lease``), a rule on the calls alone, like the rest of the books.
    """

    def __init__(self, residency: Residency, pool: SlotPool, store: "ExpertStore", mover: "Mover",
                 host: HostTier | None = None, layer_names: dict[int, str] | None = None, *,
                 read_timeout: float | None = None):
        self.residency = residency
        self.pool = pool
        self.store = store
        self.mover = mover
        self.host = host
        self.layer_names = layer_names or {}
        self.source = make_source(store, pool.device, pool.layout.dtype, pool.layout.format)
        self.reuse = True  # False: drop each expert after use (the no-reuse baseline of the benchmarks)
        self.recycle = True  # False: a step of several tokens loads as one token's does (the benchmarks' baseline)
        self.read_timeout = read_timeout  # seconds a layer waits for one expert before giving up; None: forever
        self.flow = FlowCounters()
        self._asked: dict[int, int] = {}  # layer -> experts asked for at its latest use (``_outgrown``)
        self._step_experts = 0  # their sum
        self._inflight: dict[Key, "Ticket"] = {}  # reads still moving bytes (or not yet accounted for)
        self._flight_pins: set[Key] = set()  # keys holding their flight pin (logical: see the class docstring)
        self._unread: set[Key] = set()  # resident prefetches whose read was called off: read if a layer asks
        self._prefetched: set[Key] = set()  # admitted by a prefetch, not yet requested
        self._host_pending: list[tuple[Key, "Ticket"]] = []  # host slots pinned until their copy lands
        self._quarantine: list[tuple[int, int | None, "Ticket"]] = []  # (slot, host slot, ticket) of timed-out reads
        self.lock = threading.RLock()
        self.closed = False

    @property
    def capacity(self) -> int:
        return self.residency.capacity

    # -- the layer's side ------------------------------------------------------
    def check_open(self) -> None:
        """Raise ``ModelClosedError`` once the model was closed: nothing reopens its files or threads."""
        if self.closed:
            raise ModelClosedError(
                "this model was closed (model.offload.close()): its expert files, mappings and reader threads are "
                "released, so it cannot run any more; load it again (offload_moe.load or offload_experts)"
            )

    def use(self, layer: int, experts: Sequence[int], *, tokens: int = 1) -> "Lease":
        """Use ``experts`` of ``layer`` in a ``with`` block: ``for expert, tensors in lease`` yields each one's
        tensors, the resident ones first, then each missing one once it is ready, in the order their loads
        started. Every expert stays pinned until the loop moves past it or the block ends, however it ends.

        Entering pins the resident experts and starts loading the missing ones that find a slot;
        ``lease.waiting`` is true while some found none (they start when the loop reaches them).

        ``tokens``: how many tokens the layer computes. A step of several (a batch, a prompt) may need more
        experts than the slots hold; then it recycles its own slots instead of evicting what the next layers
        need (``Lease``). Raises ``ExpertLoadError`` (a load failed or exceeded ``read_timeout``),
        ``BudgetError`` (every slot is pinned) or ``ModelClosedError``.
        """
        return Lease(self, layer, experts, tokens)

    def fill(self, keys: Sequence[Key], advance: Callable[[int], None] | None = None) -> None:
        """Load every one of ``keys`` into the device slots (they hold them all), 64 reads at a time, so that
        decoding never waits on a first touch; the statistics then start from zero, as if every expert had
        been resident from the start. ``advance(nbytes)`` after each expert."""
        with self.lock:
            for batch in _batches(keys):
                for key in batch:
                    self._start(*key)
                for key in batch:
                    self._ready(*key)
                    self._release([key])
                    if advance is not None:
                        advance(self.pool.layout.nbytes)
            self.reset_stats()

    def fill_host(self, keys: Sequence[Key], advance: Callable[[int], None] | None = None) -> None:
        """Read every one of ``keys`` from disk into the warm tier (it holds them all), 64 at a time.
        ``advance(nbytes)`` after each expert; raises ``ExpertLoadError`` naming the expert whose read failed."""
        host = self.host
        with self.lock:
            for batch in _batches(keys):
                started = []
                for key in batch:
                    slot, _ = host.residency.admit(key)
                    started.append((key, self.mover.from_disk(*key, host.pool.views(slot))))
                for key, ticket in started:
                    try:
                        ticket.transfer()
                    except Exception as e:
                        host.residency.discard(key)
                        raise self._load_error(key, e) from e
                    host.residency.release(key)
                    if advance is not None:
                        advance(host.pool.layout.nbytes)

    def prefetch(self, layer: int, experts: Sequence[int]) -> int:
        """Start loading those of ``experts`` that are neither resident nor in flight, while a slot is evictable.
        (A layer's own prefetches go through its lease, under the lock it holds.)"""
        with self.lock:
            self.check_open()
            return self._prefetch(layer, experts)

    def _outgrown(self, layer: int, asked: int) -> bool:
        """Whether a step asks for more experts than the slots hold: the experts asked for at the latest use of each
        layer (this one's now), all layers together, exceed the capacity."""
        self._step_experts += asked - self._asked.get(layer, 0)
        self._asked[layer] = asked
        return self._step_experts > self.capacity

    # -- the protocol behind use() ---------------------------------------------
    def _acquire(self, layer: int, experts: Sequence[int]) -> tuple[list[int], list[int]]:
        """Pin the resident (or in-flight) experts among ``experts``; return them and the rest."""
        self.check_open()
        if self._flight_pins:
            self._release_flight_pins()  # a new layer starts: the loads started before it are evictable again
        if self._inflight or self._quarantine or self._host_pending:
            self.reap()
        if self._prefetched:
            self._cancel_stale_prefetches(layer, experts)
        if self.source is not None:
            self.source.settle(layer, experts, self.residency.slot_of, self.flow)
        hits, misses = self.residency.request([(layer, e) for e in experts])
        resident = []
        try:
            for key, slot in hits:
                if key in self._unread:  # its read was called off: it starts now, first in line
                    self._restart(key, slot, urgent=True)
                ticket = self._inflight.get(key)
                if ticket is not None:
                    self.flow.inflight_hits += 1
                    self.mover.hurry(ticket)  # a prefetch still queued goes before the other prefetches
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.flow.prefetch_used += 1
                resident.append(key[1])
        except BaseException:
            self.residency.release_all([key for key, _ in hits if key in self.residency.slot_of])
            raise
        return resident, [expert for _, expert in misses]

    def _in_place(self, layer: int, experts: Sequence[int]) -> dict[int, dict]:
        """The tensors of those of the missing ``experts`` that the source serves without a slot."""
        out = {}
        for expert in experts:
            try:
                weights = self.source.view(layer, expert)
            except CheckpointError as e:  # the file changed on disk since load: truncated, replaced, removed
                self.residency.per_layer[layer].load_failures += 1
                raise self._load_error((layer, expert), e) from None
            if weights is not None:
                out[expert] = weights
        if out:
            self.flow.mapped += len(out)
            self.flow.mapped_bytes += len(out) * self.pool.layout.nbytes
        return out

    def _prefetch(self, layer: int, experts: Sequence[int]) -> int:
        """``prefetch`` under the lock the caller holds."""
        started = 0
        source, resident = self.source, self.residency.slot_of
        for expert in experts:
            key = (layer, expert)
            if key in resident:
                if key in self._unread:  # named again: its called-off read starts after all (the books are unchanged)
                    self._restart(key, resident[key], urgent=False)
                continue
            if source is not None and source.read_ahead(key, self.flow):
                started += 1
                continue
            if not self._start(layer, expert, prefetch=True):
                if source is None:
                    break  # every slot is pinned: the others would find none either
                continue  # an expert that cannot be mapped found no slot; the others may still be read ahead
            started += 1
        return started

    def _start(self, layer: int, expert: int, prefetch: bool = False, recycle: bool = False) -> bool:
        """Begin loading a missing expert into a slot; False when every slot is pinned (try again later).
        ``recycle``: evict one of the layer's own unpinned experts if it has one (``Residency.admit``)."""
        key = (layer, expert)
        if self.residency.full():
            return False
        slot, evicted = self.residency.admit(key, recycle)  # admit's pin is the flight pin (see the class docstring)
        self._flight_pins.add(key)
        if evicted is not None:
            if evicted in self._prefetched:
                self._prefetched.discard(evicted)
                self.flow.prefetch_wasted += 1
            if not self._vacated(evicted, slot):  # the evicted read hung: its slot is quarantined, find another
                return self._start(layer, expert, prefetch, recycle)
        try:
            self._inflight[key] = self._begin(key, slot, urgent=not prefetch)
        except BaseException:
            self._fail(key)
            raise
        if prefetch:
            self._prefetched.add(key)
            self.flow.prefetch_issued += 1
        else:
            self.residency.pins[key] += 1  # and the layer's own pin
        return True

    def _ready(self, layer: int, expert: int) -> int:
        """The slot of a pinned expert, once its bytes are usable by compute; raises ExpertLoadError if its load failed."""
        key = (layer, expert)
        ticket = self._inflight.get(key)
        if ticket is not None:
            begin = time.perf_counter()
            try:
                transfer = self.mover.wait(ticket, self.read_timeout)
            except FutureTimeout:
                self._fail(key, ticket)
                raise self._load_error(key, TimeoutError(
                    f"no data after {self.read_timeout:g} s (read_timeout); the disk may be failing or stalled"
                )) from None
            except Exception as e:
                self._fail(key)
                raise self._load_error(key, e) from e
            finally:
                self.flow.stall_seconds += time.perf_counter() - begin
            self._landed(key, transfer)
        if key in self._flight_pins:
            self._flight_pins.discard(key)
            self.residency.release(key)
        return self.residency.slot_of[key]

    def _start_blocking(self, layer: int, expert: int, recycle: bool = False) -> None:
        """``_start``, first releasing the flight pins of the loads started so far if they hold every free slot."""
        if self._start(layer, expert, recycle=recycle):
            return
        self._release_flight_pins()
        if not self._start(layer, expert, recycle=recycle):
            raise BudgetError(
                f"all {self.capacity} expert slots are pinned by the layer being computed; "
                "raise cache_experts / cache_memory"
            )

    def _release(self, keys: Sequence[Key]) -> None:
        self.residency.release_all(keys)
        if not self.reuse:
            for key in keys:
                if key not in self.residency.pins and key in self.residency.slot_of:
                    slot = self.residency.slot_of[key]
                    if self._vacated(key, slot):
                        self.residency.discard(key)

    # -- internals -------------------------------------------------------------
    def _cancel_stale_prefetches(self, layer: int, experts: Sequence[int]) -> None:
        """``layer`` runs now without these prefetched experts: call off the reads that have not started,
        so the disk serves the loads that are needed (a started read is left to land). The books keep
        them resident either way, so that no count depends on the race with the reader: one a later layer
        asks for (or a prefetch names again) is read then (``_restart``)."""
        if not self._inflight:
            return
        wanted = set(experts)
        for key in [k for k in self._inflight if k[0] == layer and k[1] not in wanted and k in self._prefetched]:
            if self._inflight[key].future.cancel():
                del self._inflight[key]
                self._unread.add(key)
                self.flow.prefetch_cancelled += 1
                self._drop_host(key)  # the host slot it was headed for holds nothing

    def _restart(self, key: Key, slot: int, urgent: bool) -> None:
        """Start the read of a resident prefetch that was called off (``_cancel_stale_prefetches``)."""
        self._unread.discard(key)
        self.flow.prefetch_cancelled -= 1  # it is read after all
        try:
            self._inflight[key] = self._begin(key, slot, urgent=urgent)
        except BaseException:
            self._fail(key)
            raise

    def _release_flight_pins(self) -> None:
        self.residency.release_all(self._flight_pins)
        self._flight_pins.clear()

    def _vacated(self, key: Key, slot: int) -> bool:
        """Wait until nothing writes into ``slot`` any more, which ``key`` (evicted or dropped) held: its read,
        if it is still moving bytes, lands (and is accounted for) or fails. False if it is still running after
        ``read_timeout``: ``slot`` is then quarantined, and whoever holds it now leaves it."""
        self._unread.discard(key)
        self._flight_pins.discard(key)
        ticket = self._inflight.pop(key, None)
        if ticket is None:
            return True
        try:
            transfer = ticket.transfer(self.read_timeout)
        except FutureTimeout:
            self.residency.per_layer[key[0]].load_failures += 1
            owner = self.residency.owner[slot]
            self._flight_pins.discard(owner)
            self.residency.discard(owner, quarantine=True)
            self._quarantine.append((slot, self._drop_host(key, quarantine=True), ticket))
            return False
        except Exception:
            self.residency.per_layer[key[0]].load_failures += 1
            self._drop_host(key)  # a host slot it was filling holds part of it at most
            return True
        self._landed(key, transfer)  # on CUDA its copy may still be queued: the next one into the slot queues behind it
        return True

    def _drop(self, key: Key, quarantine: bool = False) -> tuple[int | None, int | None]:
        """Forget a load that will not land: the key leaves its device slot, and its host slot if it was
        headed there. ``quarantine`` withholds both slots from reuse. Returns (slot, host slot)."""
        self._inflight.pop(key, None)
        self._prefetched.discard(key)
        self._unread.discard(key)
        self._flight_pins.discard(key)
        slot = self.residency.discard(key, quarantine=quarantine)
        return slot, self._drop_host(key, quarantine)

    def _drop_host(self, key: Key, quarantine: bool = False) -> int | None:
        """The host half of ``_drop``: the key leaves the host slot its read was headed for (or copied from),
        which ``quarantine`` withholds from reuse. Returns that host slot (None: it had none)."""
        if self.host is None:
            return None
        self._host_pending = [(k, t) for k, t in self._host_pending if k != key]
        return self.host.residency.discard(key, quarantine=quarantine)

    def _begin(self, key: Key, slot: int, urgent: bool = True):
        layer, expert = key
        if self.host is None:
            return self.mover.from_disk(layer, expert, self.pool.views(slot), urgent=urgent)
        hits, _ = self.host.residency.request([key])
        if hits:
            ticket = self.mover.from_host(self.host.pool.flat(hits[0][1]), self.pool.flat(slot))
        else:
            host = self.host.residency
            while host.full() and self._host_pending:
                self._settle_oldest_host_copy()  # every host slot is still feeding a device copy
            host_slot, _ = host.admit(key)
            ticket = self.mover.from_disk(layer, expert, self.host.pool.views(host_slot), device_flat=self.pool.flat(slot),
                                          host_flat=self.host.pool.flat(host_slot), urgent=urgent)
        self._host_pending.append((key, ticket))
        return ticket

    def _landed(self, key: Key, transfer) -> None:
        """Account for a load whose bytes are in (its flight pin is a separate, logical matter)."""
        self._inflight.pop(key, None)
        self.mover.account(transfer)
        layer_counters = self.residency.per_layer[key[0]]
        layer_counters.bytes_loaded += self.pool.layout.nbytes
        layer_counters.load_seconds += transfer.disk_seconds + transfer.copy_seconds
        self.flow.disk_bytes += transfer.disk_bytes
        self.flow.disk_seconds += transfer.disk_seconds
        self.flow.copy_bytes += transfer.copy_bytes
        self.flow.copy_seconds += transfer.copy_seconds

    def _fail(self, key: Key, hung=None) -> None:
        """A load failed: the key is never marked resident, and the host copy (maybe partial) is dropped.

        ``hung`` is the ticket of a read that timed out and may still write: its slots are
        quarantined until it ends, so no later expert can be overwritten by it.
        """
        slot, host_slot = self._drop(key, quarantine=hung is not None)
        self.residency.per_layer[key[0]].load_failures += 1
        if hung is not None and slot is not None:
            self._quarantine.append((slot, host_slot, hung))

    def _load_error(self, key: Key, e: BaseException) -> ExpertLoadError:
        if isinstance(e, ExpertLoadError):
            return e
        layer, expert = key
        return ExpertLoadError(
            f"loading expert {expert} of layer {layer} ({self.layer_names.get(layer, '?')}) "
            f"from {self.store.describe(layer, expert)} failed: {e}"
        )

    def _release_quarantine(self, block: bool = False) -> None:
        """Return the slots of timed-out reads that have since ended (or all, waiting, when ``block``)."""
        waiting = []
        for slot, host_slot, ticket in self._quarantine:
            if block:
                try:
                    ticket.future.exception(self.read_timeout)
                except FutureTimeout:
                    pass
            if not ticket.finished():
                waiting.append((slot, host_slot, ticket))
                continue
            if ticket.future.exception() is None:
                self.mover.settle(ticket.transfer())
            self.residency.unquarantine(slot)
            if host_slot is not None:
                self.host.residency.unquarantine(host_slot)
        self._quarantine = waiting

    def stuck_reads(self) -> int:
        """Reads that timed out and have not ended yet."""
        return sum(1 for _, _, t in self._quarantine if not t.finished())

    def _finish_flights(self) -> None:
        """Wait until every load in flight has landed (or failed, or timed out), then account for them."""
        for key, ticket in list(self._inflight.items()):
            try:
                transfer = ticket.transfer(self.read_timeout)
            except FutureTimeout:
                if key in self._prefetched:
                    self.flow.prefetch_failures += 1
                self._fail(key, ticket)
                continue
            except Exception:
                continue  # reap drops it
            self.mover.settle(transfer)
        self.reap()

    def reap(self) -> None:
        """Account for loads that landed in the background; drop failed ones; unpin landed host slots.

        A load counts as landed only once its bytes are in the slot (on CUDA: its copy event has
        completed), since a later hit on it uses the slot without waiting.
        """
        for key, ticket in list(self._inflight.items()):
            if not ticket.finished():
                continue
            try:
                transfer = ticket.transfer()
            except Exception:
                if self.residency.is_pinned(key):
                    continue  # a layer holds it: its ``_ready`` reports the failure
                if key in self._prefetched:
                    self.flow.prefetch_failures += 1
                self._fail(key)
                continue
            if self.mover.landed(transfer):
                self._landed(key, transfer)
        if self._quarantine:
            self._release_quarantine()
        if self.host is not None and self._host_pending:
            pending = []
            for key, ticket in self._host_pending:
                if ticket.finished() and (ticket.future.exception() is not None or self.mover.landed(ticket.transfer())):
                    self.host.residency.release(key)
                else:
                    pending.append((key, ticket))
            self._host_pending = pending

    def _settle_oldest_host_copy(self) -> None:
        key, ticket = self._host_pending[0]
        if ticket.future.exception() is None:
            self.mover.settle(ticket.transfer())
        self.reap()

    def drain(self) -> None:
        """Wait for every load in flight (prefetches and timed-out reads included) and account for it; release
        every flight pin, as the start of a next layer would."""
        with self.lock:
            self._release_flight_pins()
            self._finish_flights()
            self._release_quarantine(block=True)
            if self.host is not None:
                for key, ticket in self._host_pending:
                    if ticket.finished() and ticket.future.exception() is None:
                        self.mover.settle(ticket.transfer())
                        self.host.residency.release(key)
                self._host_pending = [(k, t) for k, t in self._host_pending if not t.finished()]

    def close(self) -> None:
        """Wait for the loads in flight, stop the reader threads, close the files and mappings, unlock pinned
        host slots; every later use raises ``ModelClosedError``. A second call does nothing.

        Waits for the layer another thread is computing (the lock). A read stuck in the kernel keeps
        its file and buffers: it cannot be interrupted, and it may still write into them.
        """
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.drain()
            finally:
                stuck = self.stuck_reads()
                self.mover.close(wait=not stuck)
                if not stuck:  # a stuck read still needs its file open, and may yet copy out of a host slot
                    self.store.close()
                    if self.host is not None:
                        self.host.pool.release()

    def stats(self) -> dict:
        total = self.residency.totals()
        f = self.flow
        requests = total.hits + total.misses
        stall = f.stall_seconds + self.mover.gpu_stall_seconds() - f.gpu_stall_base
        copy_seconds = f.copy_seconds + self.mover.gpu_copy_seconds() - f.gpu_copy_base
        out = {
            **total.as_dict(),
            "capacity_experts": self.capacity,
            "resident_experts": len(self.residency),
            "resident_bytes": self.pool.nbytes,
            "expert_bytes": self.pool.layout.nbytes,
            "expert_format": self.pool.layout.format_name,
            "policy": self.residency.policy.name,
            "inflight_hits": f.inflight_hits,
            "prefetch_issued": f.prefetch_issued,
            "prefetch_used": f.prefetch_used,
            "prefetch_wasted": f.prefetch_wasted,
            "prefetch_cancelled": f.prefetch_cancelled,
            "prefetch_failures": f.prefetch_failures,
            "prefetch_precision": f.prefetch_used / f.prefetch_issued if f.prefetch_issued else 0.0,
            "prefetch_recall": (total.hits + f.mapped_ahead) / requests if requests else 0.0,
            "tokens": f.tokens,
            "stall_seconds": stall,
            "stall_per_token": stall / f.tokens if f.tokens else 0.0,
            "bytes_moved": {"disk": f.disk_bytes, "host_to_device": f.copy_bytes, "mapped": f.mapped_bytes},
            "mapped_experts": f.mapped,
            "bandwidth": {
                "disk": f.disk_bytes / f.disk_seconds if f.disk_seconds else 0.0,
                "host_to_device": f.copy_bytes / copy_seconds if copy_seconds else 0.0,
            },
            "io": self.store.reader.io,
            "per_layer": {layer: c.as_dict() for layer, c in sorted(self.residency.per_layer.items())},
        }
        if self.host is not None:
            host = self.host.residency.totals()
            out["host"] = {"capacity_experts": self.host.residency.capacity, "resident_experts": len(self.host.residency),
                           "hits": host.hits, "misses": host.misses, "evictions": host.evictions,
                           "resident_bytes": self.host.pool.nbytes, "policy": self.host.residency.policy.name}
        return out

    def reset_stats(self) -> None:
        self.residency.per_layer.clear()
        if self.host is not None:
            self.host.residency.per_layer.clear()
        self.flow = FlowCounters(gpu_stall_base=self.mover.gpu_stall_seconds(), gpu_copy_base=self.mover.gpu_copy_seconds())


class Lease:
    """A layer's use of its experts (``ExpertCache.use``): a ``with`` block; iterate for ``(expert, tensors)``.

    Holds the cache's lock for the whole block: the layer's one acquisition. The tensors are a slot's views,
    or whatever the cache's source serves without a slot; the user never needs to know which.

    ``recycle`` (a step of several ``tokens`` that outgrows the cache, ``ExpertCache._outgrown``; unless
    ``ExpertCache.recycle`` is False): of the missing experts that find no free slot, only the first
    ``STEP_AHEAD`` start at once, evicting whichever key the policy chooses. The others wait until the loop is
    past the experts the block began with; then ``STREAM_DEPTH`` of them load ahead of compute, each started
    as the loop moves past an expert, and each evicts one of this layer's own unpinned experts, which the
    policy chooses among: those the loop is done with, or ones this step does not need.
    A step that needs more experts than the slots hold then streams its excess through its own slots
    instead of evicting, expert by expert, what the next layers will need (for LRU, the whole cache each
    step: a cycle longer than the cache is its worst case). Only a policy's choice among the layer's keys
    is narrowed; which key goes is still its call.
    """

    __slots__ = ("cache", "layer", "experts", "tokens", "recycle", "pinned", "waiting", "_order", "_in_place", "_open",
                 "_loads", "_held")

    def __init__(self, cache: ExpertCache, layer: int, experts: Sequence[int], tokens: int = 1):
        self.cache = cache
        self.layer = layer
        self.experts = experts
        self.tokens = tokens
        self.recycle = False  # set on entering
        self.pinned: set[int] = set()  # released however the block ends
        self.waiting: list[int] = []  # missing experts not started yet (no slot, or recycling): started when reached
        self._order: list[int] = []
        self._in_place: dict[int, dict] = {}
        self._held = 0  # the first experts of the order: resident, served in place or started when the block began
        self._open = False
        self._loads: Sequence[tuple[int, Sequence[int]]] = ()  # the prefetches of the layers ahead

    def __enter__(self) -> "Lease":
        cache, layer = self.cache, self.layer
        cache.lock.acquire()
        try:
            outgrown = cache._outgrown(layer, len(self.experts))
            self.recycle = self.tokens > 1 and cache.recycle and outgrown
            hits, misses = cache._acquire(layer, self.experts)
            self.pinned.update(hits)
            if misses and cache.source is not None:
                self._in_place = cache._in_place(layer, misses)
                misses = [e for e in misses if e not in self._in_place]
            ahead = STEP_AHEAD
            for expert in misses:
                if self.recycle and not cache.residency.free:  # this start would evict
                    if ahead == 0:
                        self.waiting.append(expert)
                        continue
                    ahead -= 1
                if cache._start(layer, expert):
                    self.pinned.add(expert)
                else:
                    self.waiting.append(expert)
            self._order = hits + list(self._in_place) + misses  # resident first, then in the order loads started
            self._held = len(self._order) - len(self.waiting)
            self._open = True
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def prefetch(self, loads: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Start the loads ``(layer, experts best first)`` named for the layers ahead: now, unless an expert of
        this layer still waits for a slot, and again when the block ends (the layer's slots are free then)."""
        self._loads = loads
        if not self.waiting:
            for layer, experts in loads:
                self.cache._prefetch(layer, experts)

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        cache, layer, in_place, pinned = self.cache, self.layer, self._in_place, self.pinned
        for done, expert in enumerate(self._order, 1):
            if not self._open:
                raise ExpertLoadError(f"the experts of layer {layer} were used after their `with cache.use(...)` block "
                                      "ended; iterate them inside the block")
            if expert in in_place:
                yield expert, in_place[expert]
                continue
            if expert in self.waiting:
                cache._start_blocking(layer, expert, recycle=self.recycle)
                self.waiting.remove(expert)
                pinned.add(expert)
            yield expert, cache.pool.weights(cache._ready(layer, expert))
            cache._release([(layer, expert)])  # the caller is done with it: its slot may serve the next one
            pinned.discard(expert)
            # the next ones load while the caller computes: STREAM_DEPTH of them, once the loop is past every
            # expert the block began with, so that the policy chooses their victims among all of those
            while (self.recycle and self.waiting and done >= self._held
                   and len(self._order) - done - len(self.waiting) < STREAM_DEPTH
                   and cache._start(layer, self.waiting[0], recycle=True)):
                pinned.add(self.waiting.pop(0))

    def __exit__(self, exc_type, *_) -> None:
        cache = self.cache
        try:
            if self.pinned:
                cache._release([(self.layer, expert) for expert in self.pinned])
                self.pinned.clear()
            self._open = False
            if exc_type is None:
                for layer, experts in self._loads:
                    cache._prefetch(layer, experts)
        finally:
            cache.lock.release()


STEP_AHEAD = 1  # loads a step of several tokens starts at once beyond the free slots (``Lease``)
STREAM_DEPTH = 2  # loads in flight ahead of compute while such a step streams through its own slots (as many as
# the default reader threads: a step whose loads cost more than its compute keeps both busy)


def _batches(keys: Sequence[Key], size: int = 64) -> Iterator[Sequence[Key]]:
    for first in range(0, len(keys), size):
        yield keys[first : first + size]
