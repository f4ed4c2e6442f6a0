"""The fast replay engine (profiling/compiled.py) against the reference: the runtime's own cache with a null mover.

The reference is the definition; the fast engine must count the same, per layer: hits, misses,
evictions, prefetches issued and prefetches used (``ReplayResult.per_layer`` and ``per_layer_flow``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_moe.policies import POLICIES as POLICIES_BY_NAME
from offload_moe.policies import Forecast
from offload_moe.prefetch import Prefetcher, TransitionPredictor
from offload_moe.profiling import compiled, predictions, replay, sweep
from offload_moe.profiling.replays import cache_counts, drive, replay_cache, replay_predictor, replay_slots
from offload_moe.traces import Trace, synthesize_trace

POLICIES = ["lru", "lfu", "fifo", "random", "belady", "forecast"]
PREDICTORS = ["none", "transition", "gate", "hybrid"]


def make_trace(route, num_experts: int, guesses=None) -> Trace:
    experts = torch.as_tensor(np.asarray(route)).to(torch.int16)
    tokens, layers, k = experts.shape
    trace = Trace(experts=experts, metadata={
        "model": "test", "num_experts": str(num_experts), "top_k": str(k),
        "layers": json.dumps(list(range(layers))), "source": "generated in the test"})
    if guesses is not None:
        trace.predicted = torch.as_tensor(np.asarray(guesses)).to(torch.int16)
        trace.metadata["predicted_by"] = "gate"
    return trace


@st.composite
def recorded_traces(draw, most_tokens=12, most_layers=4, most_experts=6, most_k=2):
    """A trace with gate guesses stored: distinct experts per token and layer (router order), guesses for the
    next layer (best first, -1 padded, -1 at the last layer)."""
    tokens, layers = draw(st.integers(1, most_tokens)), draw(st.integers(1, most_layers))
    experts = draw(st.integers(2, most_experts))
    k = draw(st.integers(1, min(most_k, experts)))
    stored = draw(st.integers(0, 2))
    width = min(k + stored, experts)
    perm = st.permutations(range(experts))
    route = [[draw(perm)[:k] for _ in range(layers)] for _ in range(tokens)]
    guesses = [[draw(perm)[:width] + [-1] * (k + stored - width) for _ in range(layers - 1)] + [[-1] * (k + stored)]
               for _ in range(tokens)]
    return make_trace(route, experts, guesses)


def both(trace: Trace, policy: str, capacity: int, **args):
    return replay(trace, policy, capacity, engine="fast", **args), replay(trace, policy, capacity, **args)


@given(trace=recorded_traces(), policy=st.sampled_from(POLICIES), predictor=st.sampled_from(PREDICTORS), data=st.data())
@settings(max_examples=150, deadline=None)
def test_the_fast_engine_counts_what_the_reference_counts(trace, policy, predictor, data):
    """Small traces, every policy and predictor, capacities from top_k to every key."""
    if policy == "belady":
        predictor = "none"
    margin = data.draw(st.integers(0, trace.prediction_margin))
    capacity = data.draw(st.integers(trace.top_k, len(trace.layers) * trace.num_experts))
    fast, reference = both(trace, policy, capacity, predictor=predictor, margin=margin, seed=data.draw(st.integers(0, 3)))
    assert fast == reference
    assert sum(e for e, _, _ in (fast.per_layer_flow or {}).values()) == fast.evictions


@given(trace=recorded_traces(most_tokens=40, most_layers=3, most_experts=16, most_k=4),
       policy=st.sampled_from(POLICIES), predictor=st.sampled_from(PREDICTORS), data=st.data())
@settings(max_examples=40, deadline=None)
def test_the_fast_engine_counts_what_the_reference_counts_under_pressure(trace, policy, predictor, data):
    """Longer traces in few slots: many evictions, so the heap rebuilds, random's pinned picks and the
    prefetches that find every slot pinned all happen."""
    if policy == "belady":
        predictor = "none"
    capacity = data.draw(st.integers(trace.top_k, 2 * trace.top_k + 2))
    fast, reference = both(trace, policy, capacity, predictor=predictor, margin=trace.prediction_margin,
                           seed=data.draw(st.integers(0, 1000)))
    assert fast == reference


def synthetic_with_guesses(tokens=100, layers=4, num_experts=16, top_k=4, margin=2, seed=1) -> Trace:
    """A synthetic trace with gate guesses stored: half of each row the next layer's real experts, half random."""
    trace = synthesize_trace(tokens=tokens, layers=layers, num_experts=num_experts, top_k=top_k, skew=1.2,
                             locality=0.3, seed=seed)
    rng = np.random.default_rng(seed)
    width = top_k + margin
    guesses = np.stack([[rng.permutation(num_experts)[:width] for _ in range(layers)] for _ in range(tokens)])
    real = trace.experts.numpy()[:, 1:, : width // 2]
    for j in range(real.shape[2]):  # put some right guesses in, keeping each row distinct
        column = real[:, :, j]
        clash = (guesses[:, :-1] == column[..., None]).any(-1)
        guesses[:, :-1, j] = np.where(clash, guesses[:, :-1, j], column)
    guesses[:, -1] = -1
    return make_trace(trace.experts, num_experts, guesses)


@pytest.mark.parametrize("policy", POLICIES)
def test_on_a_synthetic_trace_with_every_layer_evicting(policy):
    """Long enough for the rare paths: random's picks that all land on pinned keys, hybrid's tied votes, LFU's
    never-requested guesses, prefetches that find every slot pinned."""
    trace = synthetic_with_guesses()
    for predictor in ["none"] if policy == "belady" else PREDICTORS:
        for capacity in (4, 5, 12):
            for seed in (0, 7) if policy == "random" else (0,):
                fast, reference = both(trace, policy, capacity, predictor=predictor, margin=2, seed=seed)
                assert fast == reference, (predictor, capacity, seed)
                assert fast.evictions > 0 and set(fast.per_layer_flow) == set(trace.layers)


@given(trace=recorded_traces(most_tokens=30, most_experts=10, most_k=3), predictor=st.sampled_from(PREDICTORS),
       half_life=st.sampled_from([0.05, 0.5, 3.0, 100.0, 1e6]), data=st.data())
@settings(max_examples=150, deadline=None)
def test_forecast_counts_what_the_reference_counts_at_any_half_life(trace, predictor, half_life, data):
    """``forecast`` on its own, with the half-lives the policy takes: a short one drives its rates down to the
    last frequency bin, a long one keeps its decayed counts near the request counts; few slots or many."""
    margin = data.draw(st.integers(0, trace.prediction_margin))
    slots = replay_slots(trace, data.draw(st.integers(trace.top_k, len(trace.layers) * trace.num_experts)))
    cache = replay_cache(slots, Forecast(half_life))
    live = replay_predictor(trace, predictor, margin)
    prefetcher = Prefetcher(live, trace.layers, cache) if predictor != "none" else None
    try:
        want = cache_counts(cache, trace.layers, drive(trace, cache, prefetcher))
    finally:
        cache.close()
    arrays = compiled.TraceArrays(trace)
    gate, transition = arrays.guesses(predictor, margin)
    got = compiled.replay_counts(arrays.keys, arrays.starts, arrays.layers, arrays.num_experts, slots,
                                 compiled.FORECAST, gate, transition, np.empty(0, dtype=np.int64),
                                 np.zeros(624, dtype=np.int64), 624, half_life=half_life)
    assert np.array_equal(got, want)


def test_a_policy_registered_at_run_time_replays_with_the_reference(monkeypatch):
    """The fast engine compiles the built-in policies only: one registered under a new name, or over a built-in
    one, replays with the reference under either engine."""
    class MostRecent(POLICIES_BY_NAME["lru"]):  # evicts the most recently used: counts unlike lru's
        def victim(self, pinned):
            return next(key for key in reversed(self._order) if key not in pinned)

    trace = synthesize_trace(tokens=40, layers=3, num_experts=8, top_k=2, seed=1)
    lru = replay(trace, "lru", 4, engine="fast")
    for name in ("mine", "lru"):
        monkeypatch.setitem(POLICIES_BY_NAME, name, type("Mine", (MostRecent,), {"name": name}))
        fast = replay(trace, name, 4, engine="fast")
        assert fast == replay(trace, name, 4, engine="reference") and fast.hits != lru.hits


def test_python_mersenne_twister_draws_are_reproduced():
    for seed in (0, 1, 12345, 2**40 + 3):
        words, index = compiled.mt_state(seed)
        state = np.zeros(9, dtype=np.int64)
        state[compiled._MT] = index
        rng = random.Random(seed)
        for n in [1, 2, 3, 7, 100, 767, 6144, 2**31 - 1] * 100:  # past 624 words: the generator turns over
            assert compiled._randbelow(words, state, n) == rng.randrange(n)


def test_forecast_cells_are_the_policys_near_every_bin_end():
    """The compiled engine reads a cell's frequency bin off the exponent of an approximate rate, and works the rate
    out only near a power of two: the cells are ``policies.forecast._cell``'s, there above all."""
    from offload_moe.policies.forecast import _cell

    compiled.compile_kernels()
    rng = random.Random(0)
    rates = [0.0, 1e-300, 5e-324, 1.0, 2.0, 3.5]
    for j in range(-2, 12):  # each side of the bins' ends, 1/2, 1/4, .., and of other powers of two
        for ulps in (0, 1, 2, 3, 10, 2**20, 2**33, 2**34):
            rates += [0.5**j * (1 + ulps * 2.0**-52), 0.5**j * (1 - ulps * 2.0**-53)]
    rates += [rng.random() ** 4 for _ in range(2000)]
    for rate in rates:
        for denominator in (1.0, 0.3, rng.uniform(1e-3, 1.0)):
            numerator = rate * denominator
            for age in (1, 2, 3, 4, 5, 9, 33, 64, 65, 66, 1000):
                expected = _cell(age, numerator / denominator)
                assert compiled._fc_cell_of_quotient(age, numerator, denominator, 1.0 / denominator) == expected
                assert compiled._fc_cell(age, numerator / denominator) == expected


def test_transition_predictions_are_the_online_predictors_token_by_token():
    """``profiling.predictions(trace, "transition")`` (the compiled ``transition_guesses``) names what the runtime's
    ``TransitionPredictor`` names when the trace is fed to it one token at a time."""
    rng = np.random.default_rng(0)
    for tokens, layers, experts, k, margin in [(120, 4, 8, 2, 1), (80, 3, 6, 1, 2), (60, 3, 10, 3, 0), (200, 3, 32, 8, 2)]:
        # in the router's order, unsorted: float sums over k depend on it
        ids = np.stack([[rng.choice(experts, k, replace=False) for _ in range(layers)] for _ in range(tokens)])
        got = predictions(make_trace(ids, experts), "transition", margin)
        online = TransitionPredictor(layers, experts, k, margin)
        for t in range(tokens):
            for layer in range(layers):
                online.observe(layer, ids[t, layer][None])
                named = online.predict_host(layer, ids[t, layer][None])
                if layer < layers - 1:
                    assert got[t][layer] == (named[layer + 1][0].tolist() if layer + 1 in named else []), (t, layer)


def test_a_sweep_gives_the_reference_counts():
    trace = synthesize_trace(tokens=30, layers=3, num_experts=8, top_k=2, seed=2)
    kwargs = dict(policies=["lru", "lfu", "fifo", "random", "forecast"], capacities=[2, 6],
                  predictors=["none", "transition"])
    assert sweep(trace, **kwargs) == sweep(trace, engine="reference", **kwargs)


def test_without_numba_the_same_engine_runs_as_plain_python():
    """numba is optional: without it a note says so once and the same functions run uncompiled, with the same counts."""
    script = """
import sys, warnings
sys.modules["numba"] = None  # as if it were not installed
from offload_moe.profiling import replay
from offload_moe.traces import synthesize_trace
trace = synthesize_trace(tokens=12, layers=3, num_experts=8, top_k=2, seed=3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for policy in ["lru", "lfu", "fifo", "random", "belady", "forecast"]:
        predictor = "none" if policy == "belady" else "transition"
        assert replay(trace, policy, 3, predictor=predictor, engine="fast") == replay(trace, policy, 3, predictor=predictor)
notes = [str(w.message) for w in caught if "numba" in str(w.message)]
assert len(notes) == 1 and "pip install 'offload_moe[fast]'" in notes[0], notes
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
