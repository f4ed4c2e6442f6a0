"""Property tests of ``Residency`` under random layer-shaped request streams, and Belady as a lower bound."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from offload_moe.cache import Residency, simulate
from offload_moe.policies import POLICIES, Belady, make_policy

Key = tuple[int, int]

FAST = settings(max_examples=150, deadline=None)


@dataclass
class Workload:
    capacity: int
    groups: list[list[Key]]  # each: one layer asking for distinct experts at once
    policy: str
    seed: int

    @property
    def flat(self) -> list[Key]:
        return [k for g in self.groups for k in g]

    def residency(self) -> Residency:
        return Residency(self.capacity, make_policy(self.policy, seed=self.seed, future=self.flat))


@st.composite
def workloads(draw) -> Workload:
    layers = draw(st.integers(1, 4))
    experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, experts))
    capacity = draw(st.integers(top_k, top_k + 8))  # a cache must hold at least one layer's experts
    group = st.tuples(
        st.integers(0, layers - 1),
        st.lists(st.integers(0, experts - 1), min_size=1, max_size=top_k, unique=True),
    )
    groups = [[(layer, e) for e in chosen] for layer, chosen in draw(st.lists(group, max_size=60))]
    return Workload(capacity, groups, draw(st.sampled_from(sorted(POLICIES))), draw(st.integers(0, 2**16)))


def serve(table: Residency, group: list[Key], fail: set[Key] = frozenset()) -> list[Key]:
    """Serve one group the way the experts module does, checking as it goes; returns the evicted keys.

    Keys in ``fail`` are admitted then discarded, as when a load fails.
    """
    resident_before = {k for k in group if k in table}
    hits, misses = table.request(group)
    assert [k for k, _ in hits] == [k for k in group if k in resident_before]
    assert misses == [k for k in group if k not in resident_before]
    assert all(table.is_pinned(k) for k, _ in hits)
    evicted = []
    for key in misses:
        _, victim = table.admit(key)
        assert victim not in group  # the layer's own experts are pinned
        assert table.is_pinned(key)
        assert len(table) <= table.capacity
        if victim is not None:
            evicted.append(victim)
        if key in fail:
            table.discard(key)
        table.check()
    for key in group:
        table.release(key)
    table.check()
    assert not table.pins
    return evicted


@FAST
@given(workloads())
def test_residency_invariants_and_counters(w: Workload):
    table = w.residency()
    evicted_by_layer: Counter[int] = Counter()
    for group in w.groups:
        for key in serve(table, group):
            evicted_by_layer[key[0]] += 1

    totals = table.totals()
    requested_by_layer = Counter(k[0] for k in w.flat)
    assert totals.hits + totals.misses == len(w.flat)
    assert totals.evictions == max(0, totals.misses - w.capacity)
    assert len(table) == min(w.capacity, totals.misses)
    for layer, c in table.per_layer.items():
        assert c.hits + c.misses == requested_by_layer[layer]
        assert c.evictions == evicted_by_layer[layer]
    for field in ("hits", "misses", "evictions"):
        assert sum(getattr(c, field) for c in table.per_layer.values()) == getattr(totals, field)


@FAST
@given(workloads(), st.data())
def test_failed_loads_free_their_slot(w: Workload, data):
    table = w.residency()
    discarded = 0
    for group in w.groups:
        fail = set(data.draw(st.lists(st.sampled_from(group), unique=True))) - {k for k in group if k in table}
        serve(table, group, fail)
        discarded += len(fail)
        assert not fail & set(table.slot_of)
    totals = table.totals()
    assert totals.hits + totals.misses == len(w.flat)
    assert totals.misses == totals.evictions + discarded + len(table)


single_key_traces = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5)), max_size=120)


@FAST
@given(single_key_traces, st.integers(1, 6), st.integers(0, 2**16))
def test_belady_is_a_lower_bound(trace: list[Key], capacity: int, seed: int):
    best = simulate(trace, Belady(trace), capacity).misses
    for name in POLICIES:
        if name != "belady":
            assert best <= simulate(trace, make_policy(name, seed=seed), capacity).misses, name
