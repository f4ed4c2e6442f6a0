"""Trace replay through policies, capacities and predictors, against Belady's optimum."""

from __future__ import annotations

import json

import pytest
import torch

from offload_moe.errors import BudgetError, ConfigError
from offload_moe.profiling import activation_counts, layer_groups, replay, sweep
from offload_moe.traces import Trace


def make_trace(experts: torch.Tensor, num_experts: int) -> Trace:
    tokens, layers, k = experts.shape
    return Trace(experts=experts.to(torch.int16), metadata={
        "model": "test", "num_experts": str(num_experts), "top_k": str(k),
        "layers": json.dumps(list(range(layers))), "source": "generated in the test"})


def skewed_trace(tokens=300, layers=4, experts=8, k=2, seed=0) -> Trace:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(layers, experts, generator=g) * 2, -1)
    first = torch.stack([torch.multinomial(probs[l], tokens, replacement=True, generator=g) for l in range(layers)], 1)
    second = (first + 1 + torch.randint(0, experts - 1, first.shape, generator=g)) % experts
    return make_trace(torch.stack([first, second], -1)[..., :k], experts)


def test_replay_counts_a_hand_worked_trace():
    # one layer, top-1, capacity 2: accesses 0 1 0 2 1 -> LRU misses 0, 1, 2, 1 (4 misses, 1 hit)
    trace = make_trace(torch.tensor([0, 1, 0, 2, 1]).view(5, 1, 1), 3)
    lru = replay(trace, "lru", 2)
    assert (lru.requests, lru.hits, lru.misses, lru.evictions) == (5, 1, 4, 2)
    best = replay(trace, "belady", 2)
    assert best.misses == 3  # keeps 1, evicts 0 when 2 arrives


def test_groups_follow_the_runtime_order():
    trace = make_trace(torch.tensor([[[3, 1], [0, 2]]]), 4)
    assert layer_groups(trace) == [[(0, 1), (0, 3)], [(1, 0), (1, 2)]]


def test_sweep_against_belady():
    trace = skewed_trace()
    results = sweep(trace, policies=["lru", "lfu", "fifo", "random"], capacities=[4, 8, 16])
    assert {r.policy for r in results} == {"belady", "lru", "lfu", "fifo", "random"}
    for r in results:
        assert r.hits + r.misses == r.requests == 300 * 4 * 2
        assert r.misses >= r.belady_misses, r  # nothing beats the optimum on this trace
        assert r.misses_over_belady >= 1.0
    by = {(r.policy, r.capacity): r.hit_rate for r in results}
    assert by[("lru", 4)] < by[("lru", 8)] < by[("lru", 16)]  # more slots, more hits
    assert by[("belady", 16)] == max(v for (p, c), v in by.items() if c == 16)


def test_transition_prefetch_learns_a_repeating_route():
    # every token takes expert t % 4 at layer 0, then (t + 1) % 4 at layer 1, ...: perfectly predictable
    tokens, layers = 200, 4
    route = torch.tensor([[(t + l) % 4 for l in range(layers)] for t in range(tokens)]).view(tokens, layers, 1)
    trace = make_trace(route, 4)
    plain = replay(trace, "lru", 4)
    ahead = replay(trace, "lru", 4, predictor="transition", margin=0)
    assert ahead.prefetch_issued > 0 and ahead.prefetch_used > 0.9 * ahead.prefetch_issued
    assert ahead.hit_rate > plain.hit_rate + 0.5


def test_bad_replays():
    trace = skewed_trace(tokens=10)
    with pytest.raises(BudgetError, match="top_k"):
        replay(trace, "lru", 1)
    with pytest.raises(ConfigError, match="without prefetch"):
        replay(trace, "belady", 4, predictor="transition")
    with pytest.raises(ConfigError, match="gate"):
        replay(trace, "lru", 4, predictor="gate")
    with pytest.raises(ConfigError, match="unknown policies"):
        sweep(trace, policies=["mru"], capacities=[4])


def test_activation_counts():
    trace = skewed_trace(tokens=50)
    counts = activation_counts(trace)
    assert counts.shape == (4, 8) and int(counts.sum()) == 50 * 4 * 2
    assert torch.equal(counts[2], torch.bincount(trace.experts[:, 2].long().reshape(-1), minlength=8))
