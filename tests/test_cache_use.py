"""``ExpertCache.use``: the one call compute makes, its order, its pins and its counts."""

from __future__ import annotations

import random

import pytest
import torch

import offload_moe
from offload_moe.cache import Residency
from offload_moe.errors import ExpertLoadError
from offload_moe.policies import make_policy
from test_mmap import fused_checkpoint


@pytest.fixture
def models(model_dir):
    """A model with 3 slots, and one that holds every expert (filled at load): the reference tensors."""
    small = offload_moe.load(model_dir("mixtral"), cache_experts=3, dtype="float32", progress=False)
    full = offload_moe.load(model_dir("mixtral"), dtype="float32", cache_experts=10_000, progress=False)
    yield small.offload.cache, full.offload.cache
    small.offload.close()
    full.offload.close()


def _weights(cache, layer: int, expert: int) -> dict[str, torch.Tensor]:
    with cache.use(layer, [expert]) as ready:
        return {name: t.clone() for _, tensors in ready for name, t in tensors.items()}


def _no_pins(cache) -> bool:
    """Nothing is pinned but by its load in flight (once); and nothing once they landed."""
    cache.residency.check()
    only_flights = all(n == 1 and key in cache._inflight for key, n in cache.residency.pins.items())
    cache.drain()
    return only_flights and not cache.residency.pins


def test_resident_experts_come_first_then_the_missing_ones_in_start_order(models):
    cache, full = models
    layer = min(cache.layer_names)
    with cache.use(layer, [3, 1]) as ready:
        list(ready)
    with cache.use(layer, [0, 1, 2, 3]) as ready:  # 2 resident, 1 free slot for 0, and 2 waits for one
        assert ready.waiting == [2]
        got = [(expert, {k: t.clone() for k, t in tensors.items()}) for expert, tensors in ready]
    assert [e for e, _ in got] == [1, 3, 0, 2]
    for expert, tensors in got:
        want = _weights(full, layer, expert)
        assert tensors.keys() == want.keys() and all(torch.equal(tensors[k], want[k]) for k in want)
    assert _no_pins(cache)


def test_pins_are_released_when_the_block_raises(models):
    cache, _ = models
    layer = min(cache.layer_names)
    with pytest.raises(RuntimeError, match="compute failed"):
        with cache.use(layer, [0, 1, 2]) as ready:
            for _ in ready:
                assert cache.residency.pins
                raise RuntimeError("compute failed")
    assert _no_pins(cache)
    assert [e for e, _ in _drain(cache, layer, [0, 1, 2])] == [0, 1, 2]  # all resident now, still usable


def test_pins_are_released_when_the_loop_stops_early(models):
    cache, _ = models
    layer = min(cache.layer_names)
    with cache.use(layer, [0, 1, 2]) as ready:
        for _ in ready:
            break
    assert _no_pins(cache)
    with cache.use(layer, [1, 2, 3]) as ready:
        it = iter(ready)
        next(it)
        it.close()  # a generator closed by its consumer
        assert cache.residency.pins  # the experts not reached yet are still the block's
    assert _no_pins(cache)


def test_a_lease_is_not_used_after_its_block(models):
    cache, _ = models
    layer = min(cache.layer_names)
    with cache.use(layer, [0, 1]) as ready:
        it = iter(ready)
    with pytest.raises(ExpertLoadError, match=f"layer {layer} were used after"):
        next(it)
    assert _no_pins(cache)


def test_more_experts_than_slots_wait_for_one_and_still_all_run(models):
    cache, full = models
    layer = min(cache.layer_names)
    with cache.use(layer, [0, 1, 2, 3]) as ready:  # 4 experts, 3 slots
        assert ready.waiting == [3]
        got = []
        for expert, tensors in ready:
            want = _weights(full, layer, expert)
            assert all(torch.equal(tensors[k], want[k]) for k in want)
            got.append(expert)
    assert got == [0, 1, 2, 3]
    assert _no_pins(cache)


def _drain(cache, layer, experts):
    with cache.use(layer, experts) as ready:
        return list(ready)


def _reference(groups, capacity, policy):
    """The same requests through the bare bookkeeping: pin the hits, admit the misses while a slot is
    evictable, then each expert in use order (an expert without a slot is admitted when reached), released after use."""
    table = Residency(capacity, make_policy(policy, seed=0))
    for group in groups:
        hits, misses = table.request(group)
        waiting = []
        for key in misses:
            if table.full():
                waiting.append(key)
            else:
                table.admit(key)
        for key in [k for k, _ in hits] + misses:
            if key in waiting:
                table.admit(key)
            table.release(key)
    return table.totals()


@pytest.mark.parametrize("policy", ["lru", "lfu", "random"])
def test_counts_match_the_bookkeeping_on_a_fixed_sequence(model_dir, policy):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=3, dtype="float32", policy=policy, progress=False)
    cache = model.offload.cache
    layers = sorted(cache.layer_names)
    rng = random.Random(7)
    groups = []
    for _ in range(80):
        layer = rng.choice(layers)
        groups.append([(layer, e) for e in rng.sample(range(4), rng.randint(1, 4))])
    for group in groups:
        _drain(cache, group[0][0], [e for _, e in group])
    want = _reference(groups, 3, policy)
    stats = model.offload.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (want.hits, want.misses, want.evictions)
    assert want.evictions > 0 and _no_pins(cache)
    model.offload.close()


def test_with_mmap_the_missing_experts_are_views_of_the_mapping(tmp_path, models):
    folder = fused_checkpoint(tmp_path / "fused")
    model = offload_moe.load(folder, cache_experts=2, io="mmap", progress=False)
    cache = model.offload.cache
    layer = min(cache.layer_names)
    buffer = cache.pool.buffer
    lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
    with cache.use(layer, [0, 1, 2]) as ready:
        got = list(ready)
        assert not cache.residency.pins  # a view of the mapping needs no slot, so nothing is pinned
    assert [e for e, _ in got] == [0, 1, 2]
    for _, tensors in got:
        assert all(not lo <= t.data_ptr() < hi for t in tensors.values())
    assert model.offload.stats()["mapped_experts"] == 3
    model.offload.close()


class _CountingLock:
    """The cache's lock, counting how often it is taken."""

    def __init__(self, lock):
        self.lock, self.taken = lock, 0

    def acquire(self, *args, **kwargs):
        self.taken += 1
        return self.lock.acquire(*args, **kwargs)

    def release(self):
        self.lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@pytest.mark.parametrize("replace_forward", [False, True], ids=["item_by_item", "grouped"])
def test_the_generic_path_takes_the_cache_lock_once_per_use(replace_forward):
    """offload_experts' stand-ins take the lock only through their lease: once per layer (grouped), once per
    expert call (a ModuleList item), and once per step to count its tokens."""
    from test_generic import LAYERS, inputs, make_model

    model = make_model()
    handle = offload_moe.offload_experts(model, cache_experts=4, replace_forward=replace_forward)
    lock = handle.cache.lock = _CountingLock(handle.cache.lock)
    with torch.no_grad():
        model(inputs())
    taken = lock.taken
    s = handle.stats()
    handle.close()
    uses = LAYERS if replace_forward else s["hits"] + s["misses"]  # an item computes one expert
    assert s["misses"] > 0 and taken == uses + 1


class _HeldMover:
    """A mover that moves no bytes: a read a layer waits for lands at once; a prefetch's read lands when the test
    says so (``started``: it is running, so it cannot be called off). Checks that no slot is handed to a new read
    while an earlier read into it is still writing."""

    def __init__(self):
        from offload_moe.transfer import NullMover

        self._null = NullMover(0)
        self.reads: list[tuple[tuple[int, int], bool, object]] = []  # (key, urgent, future)
        self._writer: dict[int, object] = {}  # id of a slot's views -> the future writing into it
        self.copies = 0  # host slot -> device slot

    def from_disk(self, layer, expert, views, device_flat=None, host_flat=None, urgent=True):
        from concurrent.futures import Future

        from offload_moe.transfer import Ticket, Transfer

        earlier = self._writer.get(id(views))
        assert earlier is None or earlier.done(), "a slot was reused while its read was still writing"
        future = Future()
        if urgent:
            future.set_result(Transfer())
        self._writer[id(views)] = future
        self.reads.append(((layer, expert), urgent, future))
        return Ticket(future)

    def from_host(self, host_flat, device_flat):
        self.copies += 1
        return self._null.from_host(host_flat, device_flat)

    def started(self, key):
        future = next(f for k, urgent, f in self.reads if k == key and not urgent)
        future.set_running_or_notify_cancel()
        return future

    def __getattr__(self, name):  # everything else as a NullMover does it
        return getattr(self._null, name)


def _held_cache(capacity: int, read_timeout: float | None = None, host_slots: int = 0):
    from offload_moe.cache import ExpertCache, HostTier, SlotLayout, SlotPool
    from offload_moe.profiling.replays import _NoFiles

    layout = SlotLayout({}, torch.uint8)
    residency = Residency(capacity, make_policy("lru"))
    host = HostTier(Residency(host_slots, make_policy("lru")), SlotPool(host_slots, layout, torch.device("cpu"))) \
        if host_slots else None
    mover = _HeldMover()
    cache = ExpertCache(residency, SlotPool(capacity, layout, torch.device("cpu")), _NoFiles(), mover, host,
                        read_timeout=read_timeout)
    return cache, mover


def _run(cache, experts, prefetch=()):
    with cache.use(0, experts) as lease:
        if prefetch:
            lease.prefetch([(0, list(prefetch))])
        list(lease)


def _prefetch_1_then_ask_for_0(cache, mover):
    """Slots: 0 (landed, used last) and 1 (a prefetch whose read is running): the next miss evicts 1."""
    _run(cache, [0], prefetch=[1])
    running = mover.started((0, 1))
    _run(cache, [0])  # layer 0 runs without 1: its read started, so it is not called off
    return running


def test_a_victim_still_being_read_is_waited_for_and_no_count_changes():
    import threading

    from offload_moe.transfer import Transfer

    cache, mover = _held_cache(2)
    running = _prefetch_1_then_ask_for_0(cache, mover)
    threading.Timer(0.1, running.set_result, [Transfer()]).start()
    _run(cache, [2])  # evicts 1, waiting for its read to end (the mover checks the slot is not shared)
    assert running.done()
    c, f = cache.residency.totals(), cache.flow
    assert (c.hits, c.misses, c.evictions) == (1, 2, 1)
    assert (f.prefetch_issued, f.prefetch_used, f.prefetch_wasted, f.prefetch_cancelled) == (1, 0, 1, 0)
    assert sorted(cache.residency.slot_of) == [(0, 0), (0, 2)]
    cache.residency.check()


def test_a_victim_whose_read_hangs_has_its_slot_quarantined():
    from offload_moe.transfer import Transfer

    cache, mover = _held_cache(2, read_timeout=0.05)
    running = _prefetch_1_then_ask_for_0(cache, mover)
    _run(cache, [2])  # 1's read never ends: its slot is quarantined and 2 takes 0's
    assert sorted(cache.residency.slot_of) == [(0, 2)] and len(cache.residency.quarantined) == 1
    assert cache.residency.totals().load_failures == 1 and cache.stuck_reads() == 1
    running.set_result(Transfer())  # the hung read ends at last
    cache.drain()
    assert not cache.residency.quarantined and not cache.residency.pins
    cache.residency.check()


def test_a_victim_whose_read_fails_leaves_the_host_tier_too():
    """The failed read was filling a host slot: that slot holds part of the expert at most, so the next ask for
    it reads the disk again rather than copying the host slot's bytes to the device."""
    import threading

    cache, mover = _held_cache(2, host_slots=3)
    running = _prefetch_1_then_ask_for_0(cache, mover)
    assert (0, 1) in cache.host.residency
    threading.Timer(0.1, running.set_exception, [OSError("disk gone")]).start()
    _run(cache, [2])  # evicts 1, whose read fails while it is waited for
    assert (0, 1) not in cache.host.residency and cache.residency.totals().load_failures == 1
    _run(cache, [1])
    assert mover.copies == 0 and [key for key, _, _ in mover.reads].count((0, 1)) == 2  # read from disk again
    cache.drain()
    assert not cache.residency.pins and not cache.host.residency.pins
    cache.residency.check()
    cache.host.residency.check()


def test_a_victim_whose_read_hangs_has_its_host_slot_quarantined_too():
    from offload_moe.transfer import Transfer

    cache, mover = _held_cache(2, read_timeout=0.05, host_slots=3)
    running = _prefetch_1_then_ask_for_0(cache, mover)
    _run(cache, [2])  # 1's read never ends: its device and host slots are quarantined
    assert (0, 1) not in cache.host.residency and len(cache.host.residency.quarantined) == 1
    assert cache.stuck_reads() == 1
    running.set_result(Transfer())  # the hung read ends at last
    cache.drain()
    assert not cache.residency.quarantined and not cache.host.residency.quarantined
    _run(cache, [1])
    assert mover.copies == 0  # read from disk again
    cache.drain()
    cache.residency.check()
    cache.host.residency.check()


def test_a_prefetch_called_off_before_its_read_stays_resident_and_is_read_when_asked_for():
    """Whether the read had started or not, the books are the same: the prefetch is resident, and a hit."""
    cache, mover = _held_cache(2)
    _run(cache, [0], prefetch=[1])
    _run(cache, [0])  # layer 0 runs without 1, whose read has not started: it is called off
    assert cache.flow.prefetch_cancelled == 1 and (0, 1) in cache.residency
    _run(cache, [1])  # a hit, read now (urgently)
    c, f = cache.residency.totals(), cache.flow
    assert (c.hits, c.misses, c.evictions) == (2, 1, 0)
    assert (f.prefetch_issued, f.prefetch_used, f.prefetch_cancelled) == (1, 1, 0)
    assert [(key, urgent) for key, urgent, _ in mover.reads] == [((0, 0), True), ((0, 1), False), ((0, 1), True)]
    assert mover.reads[1][2].cancelled()
    cache.drain()
    assert not cache.residency.pins


# -- a step of several tokens (a batch, a prompt) recycles its own slots ---------------------------------------


def _null_cache(capacity: int, policy: str = "lru", recycle: bool = True):
    """An ``ExpertCache`` of zero-byte slots whose loads land at once (as a trace replay builds it)."""
    from offload_moe.cache import ExpertCache, SlotLayout, SlotPool
    from offload_moe.profiling.replays import _NoFiles
    from offload_moe.transfer import NullMover

    pool = SlotPool(capacity, SlotLayout({}, torch.uint8), torch.device("cpu"))
    cache = ExpertCache(Residency(capacity, make_policy(policy, seed=0)), pool, _NoFiles(), NullMover(0))
    cache.recycle = recycle
    return cache


def _step(cache, layer: int, experts: list[int], tokens: int) -> list[int]:
    with cache.use(layer, experts, tokens=tokens) as lease:
        return [e for e, _ in lease]


@pytest.mark.parametrize("recycle", [False, True])
def test_a_step_larger_than_the_cache_evicts_one_key_of_other_layers_then_recycles_its_own(recycle):
    """4 slots; layer 1 holds experts 0 and 1; a step of 4 tokens at layer 0 needs 4 experts. Two take the free
    slots, the third evicts LRU's victim (1, 0). Without the rule the fourth evicts (1, 1) too; with it, it waits
    and takes the slot of layer 0's least recently used expert, (0, 0), so layer 1 still finds (1, 1)."""
    cache = _null_cache(4, recycle=recycle)
    _step(cache, 1, [0, 1], tokens=1)
    assert _step(cache, 0, [0, 1, 2, 3], tokens=4) == [0, 1, 2, 3]
    assert sorted(cache.residency.slot_of) == ([(0, 1), (0, 2), (0, 3), (1, 1)] if recycle else
                                               [(0, 0), (0, 1), (0, 2), (0, 3)])
    _step(cache, 1, [0, 1], tokens=2)
    c = cache.residency.totals()
    assert (c.hits, c.misses) == ((1, 7) if recycle else (0, 8))
    assert _no_pins(cache)


def test_a_cycle_of_steps_larger_than_the_cache_is_no_longer_lrus_worst_case():
    """Two layers needing the same 3 experts each step (6 keys, 4 slots): the rule keeps part of each layer's
    experts resident across steps, so fewer loads."""
    counts = {}
    for recycle in (False, True):
        cache = _null_cache(4, recycle=recycle)
        for _ in range(6):
            for layer in (0, 1):
                assert sorted(_step(cache, layer, [0, 1, 2], tokens=4)) == [0, 1, 2]
        c = cache.residency.totals()
        counts[recycle] = (c.hits, c.misses)
        assert _no_pins(cache)
    assert counts == {False: (10, 26), True: (15, 21)}


def _reference_recycling(groups, capacity, policy):
    """Steps of several tokens through the bare bookkeeping. A step outgrows the cache when the experts asked for
    at the latest use of each layer exceed the slots; then: pin the hits; admit the misses while a slot is free,
    then ``STEP_AHEAD`` more evicting anywhere; then each expert in use order, released after use; once past
    those, ``STREAM_DEPTH`` waiting ones admitted ahead, recycling their own layer's keys. Otherwise as
    ``_reference``."""
    from offload_moe.cache import STEP_AHEAD, STREAM_DEPTH

    table = Residency(capacity, make_policy(policy, seed=0))
    latest = {}
    for group in groups:
        latest[group[0][0]] = len(group)
        recycle = sum(latest.values()) > capacity
        hits, misses = table.request(group)
        waiting, ahead = [], STEP_AHEAD if recycle else len(misses)
        for key in misses:
            if not table.free:
                if ahead == 0 or table.full():
                    waiting.append(key)
                    continue
                ahead -= 1
            table.admit(key)
        order = [k for k, _ in hits] + misses
        held = len(order) - len(waiting)
        for done, key in enumerate(order, 1):
            if key in waiting:
                waiting.remove(key)
                table.admit(key, recycle=recycle)
            table.release(key)
            while recycle and waiting and done >= held and len(order) - done - len(waiting) < STREAM_DEPTH:
                table.admit(waiting.pop(0), recycle=True)
    return table.totals()


@pytest.mark.parametrize("policy", ["lru", "lfu", "random", "forecast"])
def test_recycling_steps_count_what_the_bookkeeping_counts(policy):
    rng = random.Random(11)
    groups = []
    for _ in range(300):
        layer = rng.randrange(3)
        groups.append([(layer, e) for e in sorted(rng.sample(range(8), rng.randint(1, 8)))])
    cache = _null_cache(6, policy)
    for group in groups:
        experts = [e for _, e in group]
        assert sorted(_step(cache, group[0][0], experts, tokens=8)) == experts  # each needed expert, once
        cache.residency.check()
    want = _reference_recycling(groups, 6, policy)
    got = cache.residency.totals()
    assert (got.hits, got.misses, got.evictions) == (want.hits, want.misses, want.evictions)
    assert got.evictions > 0 and _no_pins(cache)


def test_steps_of_one_token_do_not_recycle():
    """One token's layer loads as it always did (a trace replay counts what the live runtime counted)."""
    rng = random.Random(5)
    groups = [sorted(rng.sample(range(8), rng.randint(1, 4))) for _ in range(200)]
    counts = []
    for recycle in (False, True):
        cache = _null_cache(5, recycle=recycle)
        for i, experts in enumerate(groups):
            _step(cache, i % 3, experts, tokens=1)
        c = cache.residency.totals()
        counts.append((c.hits, c.misses, c.evictions))
    assert counts[0] == counts[1]


def test_residency_recycles_a_layers_own_key_or_any_when_it_has_none():
    table = Residency(3, make_policy("lru"))
    for key in [(1, 0), (0, 0), (1, 1)]:
        table.admit(key)
        table.release(key)
    assert table.admit((0, 5), recycle=True) == (1, (0, 0))  # LRU's pick among layer 0's keys, not (1, 0)
    assert table.admit((2, 0), recycle=True) == (0, (1, 0))  # layer 2 holds nothing: LRU's pick among all
    table.check()
