"""Eviction policies: a contract every policy passes, then what is special to each."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from offload_moe.cache import Residency, simulate
from offload_moe.errors import ConfigError, PolicyError
from offload_moe.policies import FIFO, LFU, LRU, POLICIES, Belady, EvictionPolicy, Random, make_policy

Key = tuple[int, int]

# Silberschatz's reference string; with 3 frames: OPT 9 faults, LRU 12, FIFO 15.
TEXTBOOK = [(0, p) for p in [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]]


def random_keys(n: int, *, layers: int = 3, experts: int = 8, seed: int = 0) -> list[Key]:
    rng = random.Random(seed)
    return [(rng.randrange(layers), rng.randrange(experts)) for _ in range(n)]


def random_groups(n: int, *, layers: int = 4, experts: int = 8, top_k: int = 2, seed: int = 0) -> list[list[Key]]:
    """``n`` requests as a model makes them: each layer in turn asks for ``top_k`` distinct experts."""
    rng = random.Random(seed)
    return [[(i % layers, e) for e in rng.sample(range(experts), top_k)] for i in range(n)]


def drive(policy: EvictionPolicy, accesses: Sequence[Key], capacity: int, rng: random.Random) -> None:
    """Call the policy in the cache's order without a cache, pinning a random subset at each eviction."""
    resident: set[Key] = set()
    for key in accesses:
        policy.on_access(key)
        if key in resident:
            continue
        if len(resident) == capacity:
            pinned = set(rng.sample(sorted(resident), rng.randrange(capacity)))
            victim = policy.victim(pinned)
            assert victim in resident and victim not in pinned
            policy.on_evict(victim)
            resident.remove(victim)
        policy.on_insert(key)
        resident.add(key)


class PolicyContract:
    """What every policy must do. A subclass supplies ``make(future)``: ``future`` is the exact
    sequence of keys the test will pass to ``on_access``, which only Belady uses."""

    def make(self, future: Sequence[Key]) -> EvictionPolicy:
        raise NotImplementedError

    def test_is_a_registered_policy(self):
        policy = self.make([])
        assert isinstance(policy, EvictionPolicy)
        assert POLICIES[policy.name] is type(policy)

    @pytest.mark.parametrize("capacity", [1, 2, 5])
    def test_victim_is_resident_and_evictable(self, capacity):
        accesses = random_keys(2000, seed=capacity)
        drive(self.make(accesses), accesses, capacity, random.Random(capacity))

    @pytest.mark.parametrize("capacity", [2, 3, 8, 17])
    def test_residency_stays_consistent_over_long_run(self, capacity):
        groups = random_groups(3000, top_k=2, seed=capacity)
        table = Residency(capacity, self.make([k for g in groups for k in g]))
        for group in groups:
            hits, misses = table.request(group)
            for key in misses:
                _, evicted = table.admit(key)
                assert evicted not in group
            table.check()
            for key in group:
                table.release(key)
        totals = table.totals()
        assert totals.hits + totals.misses == 2 * len(groups)
        assert totals.evictions == max(0, totals.misses - capacity)

    def test_simulate_counts_add_up(self):
        accesses = random_keys(5000, seed=7)
        counters = simulate(accesses, self.make(accesses), 6)
        assert counters.hits + counters.misses == len(accesses)
        assert counters.evictions == counters.misses - 6

    def test_capacity_one_hits_only_repeats(self):
        accesses = random_keys(500, layers=1, experts=3, seed=1)
        counters = simulate(accesses, self.make(accesses), 1)
        assert counters.hits == sum(a == b for a, b in zip(accesses, accesses[1:]))

    def test_evicted_keys_are_never_chosen(self):
        keys = [(0, e) for e in range(6)]
        policy = self.make(keys)
        for key in keys:
            policy.on_access(key)
            policy.on_insert(key)
        for key in keys[:5]:
            policy.on_evict(key)
        assert policy.victim(set()) == keys[5]

    def test_evicting_an_unknown_key_is_harmless(self):
        policy = self.make([(0, 0)])
        policy.on_evict((9, 9))
        policy.on_access((0, 0))
        policy.on_insert((0, 0))
        policy.on_evict((9, 9))
        assert policy.victim(set()) == (0, 0)

    def test_discard_through_residency(self):
        accesses = [(0, 0), (0, 1), (0, 2), (0, 3)]
        table = Residency(2, self.make(accesses))
        for key in accesses[:2]:
            table.request([key])
            table.admit(key)
            table.release(key)
        table.discard((0, 0))
        for key in accesses[2:]:
            table.request([key])
            _, evicted = table.admit(key)
            assert evicted in (None, (0, 1))
            table.release(key)
        table.check()

    def test_victim_without_evictable_key_raises(self):
        policy = self.make([(0, 0)])
        policy.on_access((0, 0))
        policy.on_insert((0, 0))
        with pytest.raises(PolicyError):
            policy.victim({(0, 0)})


def inserted(policy: EvictionPolicy, keys: Sequence[Key]) -> EvictionPolicy:
    for key in keys:
        policy.on_access(key)
        policy.on_insert(key)
    return policy


A, B, C, D = (0, 0), (0, 1), (0, 2), (0, 3)


class TestLRU(PolicyContract):
    def make(self, future):
        return LRU()

    def test_access_makes_most_recent(self):
        policy = inserted(LRU(), [A, B, C])
        policy.on_access(A)
        assert policy.victim(set()) == B

    def test_skips_pinned(self):
        policy = inserted(LRU(), [A, B, C])
        assert policy.victim({A}) == B

    def test_textbook_misses(self):
        assert simulate(TEXTBOOK, LRU(), 3).misses == 12


class TestFIFO(PolicyContract):
    def make(self, future):
        return FIFO()

    def test_accesses_do_not_reorder(self):
        policy = inserted(FIFO(), [A, B, C])
        for _ in range(5):
            policy.on_access(A)
        assert policy.victim(set()) == A

    def test_reinserted_key_goes_last(self):
        policy = inserted(FIFO(), [A, B, C])
        policy.on_evict(A)
        inserted(policy, [A])
        assert policy.victim(set()) == B

    def test_textbook_misses(self):
        assert simulate(TEXTBOOK, FIFO(), 3).misses == 15


class TestLFU(PolicyContract):
    def make(self, future):
        return LFU()

    def test_lowest_count_goes(self):
        policy = inserted(LFU(), [A, B, C])
        for key in [A, A, C]:
            policy.on_access(key)
        assert policy.counts == {A: 3, B: 1, C: 2}
        assert policy.victim(set()) == B

    def test_tie_goes_to_least_recently_accessed(self):
        policy = inserted(LFU(), [A, B, C])
        for key in [B, A, C]:
            policy.on_access(key)
        assert policy.victim(set()) == B

    def test_counts_survive_eviction(self):
        policy = inserted(LFU(), [A, B])
        for _ in range(4):
            policy.on_access(A)
        policy.on_evict(A)
        policy.on_access(B)
        inserted(policy, [A])  # A: 6 requests, B: 2
        assert policy.victim(set()) == B

    def test_pinned_entries_are_kept(self):
        policy = inserted(LFU(), [A, B, C])
        policy.on_access(C)
        policy.on_access(C)
        assert policy.victim({A, B}) == C
        assert policy.victim({A}) == B  # B was popped past once and must still be there
        assert policy.victim(set()) == A

    def test_victims_match_a_brute_force_reference(self):
        # the heap skips work (requests never touch it); the answer must still be the lowest (count, last request)
        import random

        rng = random.Random(7)
        policy, counts, last, resident = LFU(), {}, {}, set()
        for tick in range(1, 5000):
            key = (0, rng.randrange(12))
            policy.on_access(key)
            counts[key] = counts.get(key, 0) + 1
            last[key] = tick
            if key in resident:
                continue
            if len(resident) == 6:
                pinned = {(0, rng.randrange(12)) for _ in range(2)} | {key}
                evictable = [k for k in resident if k not in pinned]
                want = min(evictable, key=lambda k: (counts[k], last[k]))
                got = policy.victim(pinned)
                assert got == want, tick
                policy.on_evict(got)
                resident.discard(got)
            policy.on_insert(key)
            resident.add(key)
        assert len(policy._heap) <= 2 * 6 + 33

    def test_heap_stays_bounded_under_hits(self):
        policy = inserted(LFU(), [A, B, C])
        for i in range(10_000):
            policy.on_access([A, B, C][i % 3])
        assert len(policy._heap) <= 2 * 3 + 33


class TestRandom(PolicyContract):
    def make(self, future):
        return Random(seed=3)

    def victims(self, seed: int) -> list[Key]:
        table = Residency(4, Random(seed))
        out = []
        for key in random_keys(300, layers=1, experts=12, seed=5):
            _, misses = table.request([key])
            if misses:
                out.append(table.admit(key)[1])
            table.release(key)
        return out

    def test_same_seed_same_choices(self):
        assert self.victims(1) == self.victims(1)
        assert self.victims(1) != self.victims(2)

    def test_only_evictable_chosen(self):
        keys = [(0, e) for e in range(100)]
        policy = inserted(Random(0), keys)
        for target in keys[::7]:
            assert policy.victim(set(keys) - {target}) == target  # mostly the fallback scan

    def test_choice_is_spread(self):
        keys = [(0, e) for e in range(4)]
        policy = inserted(Random(0), keys)
        chosen = {policy.victim({A}) for _ in range(200)}
        assert chosen == {B, C, D}

    def test_swap_remove_keeps_index(self):
        policy = inserted(Random(0), [A, B, C, D])
        policy.on_evict(A)
        policy.on_evict(C)
        assert sorted(policy._keys) == [B, D]
        assert all(policy._keys[i] == k for k, i in policy._index.items())


class TestBelady(PolicyContract):
    def make(self, future):
        return Belady(future)

    def test_textbook_optimum(self):
        assert simulate(TEXTBOOK, Belady(TEXTBOOK), 3).misses == 9

    def test_evicts_farthest_next_use(self):
        future = [A, B, C, D, C, A, B]
        policy = Belady(future)
        for key in future[:3]:
            policy.on_access(key)
            policy.on_insert(key)
        policy.on_access(D)
        assert policy.victim(set()) == B  # next uses: C at 4, A at 5, B at 6

    def test_never_used_again_goes_first(self):
        future = [A, B, C, A, B]
        policy = inserted(Belady(future), future[:3])
        assert policy.victim(set()) == C
        assert policy.victim({C}) == B

    def test_divergence_raises(self):
        policy = Belady([A, B, C])
        policy.on_access(A)
        with pytest.raises(PolicyError, match=r"access 1 expected \(0, 1\) but received \(0, 3\)") as err:
            policy.on_access(D)
        assert "trace" in str(err.value)

    def test_exhausted_future_raises(self):
        policy = Belady([A])
        policy.on_access(A)
        with pytest.raises(PolicyError, match="access 1"):
            policy.on_access(A)


class TestMakePolicy:
    @pytest.mark.parametrize("name", ["lru", "LRU", "Lfu", "fifo", "RANDOM"])
    def test_names_are_case_insensitive(self, name):
        assert make_policy(name).name == name.lower()

    def test_every_registered_name_builds(self):
        for name, cls in POLICIES.items():
            assert type(make_policy(name, future=[])) is cls

    def test_seed_reaches_random(self):
        assert make_policy("random", seed=42).seed == 42

    def test_belady_gets_future(self):
        policy = make_policy("Belady", future=[A, B])
        assert isinstance(policy, Belady) and list(policy.future) == [A, B]

    def test_unknown_name_lists_known(self):
        with pytest.raises(ConfigError, match="lru.*lfu.*fifo.*random.*belady"):
            make_policy("arc")

    def test_belady_without_future(self):
        with pytest.raises(ConfigError, match="future access sequence.*profiling"):
            make_policy("belady")


def test_a_policy_written_for_the_old_victim_interface_keeps_working_with_a_deprecation():
    from offload_moe.cache import Residency
    from offload_moe.policies.base import EvictionPolicy

    with pytest.warns(DeprecationWarning, match=r"victim\(self, pinned\)"):
        class OldestFirst(EvictionPolicy):
            name = "oldest-first"

            def __init__(self):
                self.order = []

            def on_insert(self, key):
                self.order.append(key)

            def on_evict(self, key):
                self.order.remove(key)

            def victim(self, evictable):
                return next(k for k in self.order if evictable(k))

    r = Residency(2, OldestFirst())
    for key in [(0, 0), (0, 1)]:
        r.admit(key)
        r.release(key)
    r.pins[(0, 0)] += 1  # pinned: the old-style policy must skip it
    slot, evicted = r.admit((0, 2))
    assert evicted == (0, 1)
