"""token-forecast: forecast told each step's token, keeping what that token (and the one after it) chose before."""

from __future__ import annotations

import random

import pytest
import torch

import offload_moe
from offload_moe.cache import Residency
from offload_moe.errors import PolicyError
from offload_moe.policies import Forecast, TokenForecast, reads_tokens
from offload_moe.policies.token_forecast import _Counts
from offload_moe.profiling import reference_trace_path, replay
from offload_moe.traces import Trace, load_trace, synthesize_trace

from test_policies import PolicyContract


class TestTokenForecast(PolicyContract):
    def make(self, future):
        return TokenForecast()


def step(table: Residency, token: int | None, routing: list[list[int]]) -> list[tuple]:
    """One decoding step through ``table``: the token named, then each layer's experts requested; the evictions."""
    table.policy.on_tokens(None if token is None else [token])
    evicted = []
    for layer, experts in enumerate(routing):
        group = [(layer, e) for e in experts]
        _, misses = table.request(group)
        for key in misses:
            evicted.append(table.admit(key)[1])
        table.check()
        for key in group:
            table.release(key)
    return evicted


def test_only_token_forecast_reads_tokens():
    assert reads_tokens(TokenForecast()) and not reads_tokens(Forecast())


def test_victims_stay_resident_and_unpinned_while_tokens_are_named():
    rng = random.Random(3)
    table = Residency(5, TokenForecast())
    for _ in range(600):
        token = rng.choice([None, rng.randrange(6), rng.randrange(6)])
        step(table, token, [rng.sample(range(6), 2) for _ in range(3)])
        if rng.random() < 0.1:  # a prompt's step, or one of several rows
            table.policy.on_tokens(rng.choice([None, [1, 2, 3]]))
    totals = table.totals()
    assert totals.hits + totals.misses == 600 * 6 and totals.evictions == totals.misses - 5


def test_a_token_keeps_the_experts_it_chose_before():
    """Token 7 once went to expert 3 at layer 1; token 8 to expert 2 there, six times since. When 7 comes
    back and layer 0 needs a slot, forecast gives up the rarely used (1, 3); token-forecast keeps it for 7."""
    victims = {}
    for policy in (Forecast(), TokenForecast()):
        table = Residency(3, policy)
        step(table, 7, [[1], [3]])
        for _ in range(6):
            step(table, 8, [[1], [2]])
        policy.on_tokens([7])
        table.request([(0, 5)])  # token 7's layer 0, a new expert: the cache is full
        victims[policy.name] = table.admit((0, 5))[1]
    assert victims["forecast"] == (1, 3)
    assert victims["token-forecast"] != (1, 3)


def test_the_token_after_keeps_the_experts_its_followers_chose():
    """9 was followed by 4, which went to expert 6 at layer 0. While 9 runs its last layer, forecast gives up
    (0, 6), used once; token-forecast keeps it for the token it expects next."""
    victims = {}
    for policy in (Forecast(), TokenForecast()):
        table = Residency(3, policy)
        step(table, 9, [[0], [1]])
        step(table, 4, [[6], [1]])
        for _ in range(5):
            step(table, 5, [[0], [1]])
        policy.on_tokens([9])
        table.request([(0, 0)])
        table.release((0, 0))
        table.request([(1, 7)])  # token 9's layer 1, a new expert: the cache is full
        victims[policy.name] = table.admit((1, 7))[1]
    assert victims["forecast"] == (0, 6)
    assert victims["token-forecast"] != (0, 6)


def test_without_token_ids_it_counts_what_forecast_counts():
    trace = synthesize_trace(tokens=300, layers=4, num_experts=8, top_k=2, skew=1.0, locality=0.3, seed=4)
    assert trace.token_ids is None
    for capacity in (4, 8, 16):
        a, b = replay(trace, "forecast", capacity), replay(trace, "token-forecast", capacity)
        assert (a.hits, a.misses, a.evictions, a.per_layer) == (b.hits, b.misses, b.evictions, b.per_layer)


def test_steps_of_no_known_token_count_what_forecast_counts():
    trace = synthesize_trace(tokens=200, layers=4, num_experts=8, top_k=2, seed=5)
    named = Trace(experts=trace.experts, metadata=dict(trace.metadata), token_ids=None)
    a, b = replay(named, "forecast", 6, engine="reference"), replay(named, "token-forecast", 6, engine="reference")
    assert (a.hits, a.evictions) == (b.hits, b.evictions)


def test_on_the_bundled_trace_it_beats_forecast_where_memory_is_tightest():
    trace = load_trace(reference_trace_path())
    capacity = 12  # 12.5% of the 96 experts: one token's worth
    assert replay(trace, "token-forecast", capacity).hits > 1.04 * replay(trace, "forecast", capacity).hits


def test_a_trace_file_in_pieces_counts_what_the_trace_in_memory_counts(tmp_path):
    from offload_moe.profiling import replay_in_pieces
    from offload_moe.traces import TraceFile

    whole = replay(load_trace(reference_trace_path()).first(600), "token-forecast", 12)
    source = TraceFile.open(reference_trace_path()).first(600)
    pieces = replay_in_pieces(source, [("token-forecast", 12, "none")], chunk_tokens=128)[0]
    assert (pieces.hits, pieces.misses, pieces.per_layer) == (whole.hits, whole.misses, whole.per_layer)


def test_the_tables_forget_the_least_recently_seen_tokens_beyond_their_bound():
    counts = _Counts(max_entries=4)
    counts.add(1, {0: [1, 2]})
    counts.add(2, {0: [3]})
    counts.add(1, {0: [1]})  # 1 seen again: 2 is now the least recently seen
    counts.add(3, {0: [4, 5]})
    assert 2 not in counts.tokens and counts.entries <= 4
    assert counts.expected(1, 1) == {0: [1]}
    assert counts.expected(3, 2) == {0: [4, 5]} and counts.expected(None, 2) == {}


@pytest.mark.parametrize("setting", ["width", "follow_width", "max_entries"])
def test_settings_must_be_whole_numbers(setting):
    with pytest.raises(PolicyError, match=setting):
        TokenForecast(**{setting: -1})


# -- in the runtime ---------------------------------------------------------------------------------------------


@pytest.fixture
def bundled():
    model = offload_moe.load(offload_moe.demo_model_path(), cache_experts=12, policy="token-forecast",
                             dtype="float32", progress=False)
    yield model
    model.offload.close()


def test_the_runtime_names_each_steps_tokens_to_the_policy(bundled):
    told = []
    policy = bundled.offload.cache.residency.policy
    real = policy.on_tokens
    policy.on_tokens = lambda tokens: told.append(tokens) or real(tokens)
    prompt = torch.tensor([[5, 6, 7]])
    out = bundled.generate(prompt, max_new_tokens=3, do_sample=False)
    assert told[0] == [5, 6, 7]  # the prompt's step
    assert told[1:] == [[t] for t in out[0, 3:5].tolist()]  # then one token a step (the last is never run)
    told.clear()
    bundled(torch.tensor([[1, 2], [3, 4]]))  # two rows: no tokens named
    assert told == [None]


def test_live_decoding_counts_what_the_replay_of_its_trace_counts(bundled):
    """The bundled model decoding its held-out text teacher forced, one token a step, hits and misses as the
    replay of the trace recorded from that text counts them."""
    from offload_moe.generation import kv_cache_kwargs, kv_cache_of

    trace = load_trace(reference_trace_path()).first(64)
    ids = trace.token_ids.long()
    with torch.inference_mode():
        result = bundled(ids[:1].unsqueeze(0), use_cache=True)
        for t in range(1, 64):
            past = kv_cache_kwargs(bundled, kv_cache_of(result))
            result = bundled(ids[t : t + 1].unsqueeze(0), **past, use_cache=True)
    stats = bundled.offload.stats()
    replayed = replay(trace, "token-forecast", 12)
    assert (stats["hits"], stats["misses"]) == (replayed.hits, replayed.misses)


def test_closing_removes_the_hook():
    model = offload_moe.load(offload_moe.demo_model_path(), cache_experts=12, policy="token-forecast",
                             dtype="float32", progress=False)
    policy = model.offload.cache.residency.policy
    told = []
    policy.on_tokens = told.append
    model.offload.close()
    assert not model._forward_pre_hooks
    assert told == []
