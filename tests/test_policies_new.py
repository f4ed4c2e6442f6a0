"""The forecast policy: the contract every policy passes, and the mechanism it wins by."""

from __future__ import annotations

import pytest

from offload_moe.errors import PolicyError
from offload_moe.policies import Forecast
from offload_moe.profiling import layer_groups, replay
from offload_moe.traces import synthesize_trace

from test_policies import PolicyContract, inserted


class TestForecast(PolicyContract):
    def make(self, future):
        return Forecast()


def test_beats_lru_where_lru_evicts_the_next_layer():
    # 16 layers of 8 experts, top-2, slots for half a token's experts: LRU always evicts the layer asked for next
    trace = synthesize_trace(tokens=400, layers=16, num_experts=8, top_k=2, skew=1.5, locality=0.1, seed=1)
    requests = 2 * len(layer_groups(trace))
    assert replay(trace, "lru", 16).hits < 0.02 * requests
    assert replay(trace, "forecast", 16).hits > 0.25 * requests


def test_beats_lru_and_lfu_on_recent_experts_returning():
    # uniform popularity, strong locality: frequency says nothing, the last token's experts come back
    trace = synthesize_trace(tokens=600, layers=6, num_experts=16, top_k=2, skew=0.0, locality=0.5, seed=2)
    forecast = replay(trace, "forecast", 24).hits
    assert forecast > replay(trace, "lru", 24).hits
    assert forecast > replay(trace, "lfu", 24).hits


def test_the_layer_asked_for_next_stays():
    policy = inserted(Forecast(), [(0, 0), (1, 0), (2, 0)])  # one token, expert 0 at each layer
    for layer in (0, 1, 2):  # the next token, the same experts
        policy.on_access((layer, 0))
    policy.on_access((0, 1))  # third token, layer 0 asks for a new expert: layer 1 comes next, layer 0 was just used
    assert policy.victim({(0, 1)}) in {(0, 0), (2, 0)}
    assert policy.victim({(0, 1)}) != (1, 0)


def test_a_prefetched_key_is_kept_until_its_layer_runs():
    policy = inserted(Forecast(), [(0, 0), (1, 0), (0, 1), (1, 0)])
    policy.on_access((0, 2))
    policy.on_insert((1, 5))  # named for layer 1 by a prefetch, never requested before
    assert policy.victim({(0, 2)}) != (1, 5)
    policy.on_access((1, 0))  # layer 1 runs without it: now it goes first
    policy.on_access((0, 0))
    assert policy.victim({(0, 0)}) == (1, 5)


def test_half_life_must_be_positive():
    with pytest.raises(PolicyError, match="half_life"):
        Forecast(half_life=0)


def test_replays_in_the_reference_engine_with_prefetch():
    trace = synthesize_trace(tokens=200, layers=4, num_experts=8, top_k=2, seed=3)
    result = replay(trace, "forecast", 8, predictor="transition")
    assert result.hits + result.misses == result.requests > 0
    assert result.prefetch_issued > 0


def test_an_expert_left_out_of_visits_decays_once_per_visit(monkeypatch):
    """An expert's decayed count fades by ``decay`` once per visit of its layer since its last request (the
    score of its next visit reads count * decay ** visits), not twice over the visits it was left out of."""
    import offload_moe.policies.forecast as forecast

    looked_up = []
    real_cell = forecast._cell
    monkeypatch.setattr(forecast, "_cell", lambda age, rate: looked_up.append((age, rate)) or real_cell(age, rate))
    policy = Forecast(half_life=1.0)  # decay 0.5 a visit
    for visit_experts in ([0], [1], [1]):  # three visits of layer 0: expert 0 at the first only
        for expert in visit_experts:
            policy.on_access((0, expert))
        policy.on_access((1, 0))  # another layer: the visit of layer 0 ends
    # at the third visit's end: expert 0 last counted at visit 1, so 1 * 0.5 ** 2, times (1 - decay) over the decayed
    # count of 3 visits (1 - 0.5 ** 3); it looks its next visit up at age 3
    age, rate = [call for call in looked_up if call[0] == 3][-1]
    assert rate == pytest.approx(0.25 * 0.5 / 0.875)
