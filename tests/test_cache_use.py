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
