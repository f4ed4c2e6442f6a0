"""Trace replay through policies, capacities and predictors, against Belady's optimum."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest
import torch

from offload_moe.errors import BudgetError, ConfigError, OutputError
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
    assert lru.per_layer == {0: (1, 4)}
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


# ---------------------------------------------------------------- predictions worked out before the replay


def test_gate_replay_uses_the_stored_predictions():
    # two layers of two experts, capacity 2, top-1: layer 0 always takes expert 0, layer 1 alternates,
    # and the stored gate guess for layer 1 is always right. With prefetch only the first access misses;
    # without it, layer 1 misses every time (its expert was evicted by the other one).
    tokens = 20
    route = torch.tensor([[0, t % 2] for t in range(tokens)]).view(tokens, 2, 1)
    trace = make_trace(route, 2)
    trace.predicted = torch.stack([route[:, 1], torch.full((tokens, 1), -1)], 1).to(torch.int16)  # [T, 2, 1]
    trace.metadata["predicted_by"] = "gate"
    plain = replay(trace, "lru", 2)
    ahead = replay(trace, "lru", 2, predictor="gate", margin=0)
    assert (plain.misses, plain.hits) == (1 + tokens, tokens - 1)
    assert (ahead.misses, ahead.prefetch_issued, ahead.prefetch_used) == (1, tokens, tokens)
    assert ahead.loads == 1 + tokens and ahead.prefetch_precision == 1.0
    with pytest.raises(ConfigError, match="re-record with --margin 1"):
        replay(trace, "lru", 2, predictor="gate", margin=1)
    trace.predicted = None
    with pytest.raises(ConfigError, match="stores no gate predictions"):
        replay(trace, "lru", 2, predictor="gate")


def test_parse_capacities():
    from offload_moe.profiling import parse_capacities

    assert parse_capacities("12.5%, 25%,50%", 96) == [12, 24, 48]
    assert parse_capacities("32,8,25%", 96) == [8, 24, 32]
    for bad, match in [("lots", "neither a number"), ("0", "between 1"), ("200%", "between 1"), ("", "no capacities")]:
        with pytest.raises(ConfigError, match=match):
            parse_capacities(bad, 96)


def test_write_results_files_and_plots(tmp_path):
    from offload_moe.profiling import write_results

    trace = skewed_trace(tokens=40)
    results = sweep(trace, policies=["lru"], capacities=[4, 8], predictors=["none", "transition"])
    written = write_results(results, trace, tmp_path / "out", seconds=0.5)
    document = json.loads(written["json"].read_text())
    assert len(document["results"]) == len(results) == 2 * (1 + 2)
    first = document["results"][0]
    assert sum(h + m for h, m in first["per_layer"].values()) == first["requests"]  # per layer, in the JSON
    assert document["trace"]["accesses"] == 40 * 4 and document["machine"]["torch"]
    lines = written["csv"].read_text().splitlines()
    assert lines[0].startswith("policy,capacity,predictor,requests,hits") and len(lines) == 1 + len(results)
    for name in ("hit_rate_plot", "tradeoff_plot", "heatmap"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["activations.png", "hit_rate.png",
                                                                     "results.csv", "results.json", "tradeoff.png"]
    one = write_results([r for r in results if r.capacity == 4], trace, tmp_path / "one")  # a single panel
    assert one["tradeoff_plot"].stat().st_size > 0


def test_write_results_without_matplotlib_says_how_to_get_plots(tmp_path, monkeypatch):
    import builtins

    from offload_moe.profiling import write_results

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    trace = skewed_trace(tokens=20)
    written = write_results(sweep(trace, policies=["lru"], capacities=[4]), trace, tmp_path)
    assert "offload_moe[plot]" in written["plots"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]


@pytest.mark.slow
def test_sweep_in_processes_gives_the_serial_results():
    trace = skewed_trace(tokens=200)
    args = dict(policies=["lru", "lfu", "random"], capacities=[4, 8], predictors=["none", "transition"])
    done = []
    parallel = sweep(trace, workers=2, progress=done.append, **args)
    assert parallel == sweep(trace, workers=1, **args)
    assert len(done) == len(parallel) == 2 * (1 + 3 * 2)


def test_a_policy_added_at_run_time_is_replayed(monkeypatch):
    from offload_moe.policies import POLICIES, EvictionPolicy

    class MostRecentlyUsed(EvictionPolicy):
        name = "mru"

        def __init__(self):
            self.order: list = []

        def on_access(self, key):
            if key in self.order:
                self.order.remove(key)
                self.order.append(key)

        def on_insert(self, key):
            self.order.append(key)

        def on_evict(self, key):
            if key in self.order:
                self.order.remove(key)

        def victim(self, pinned):
            return next(k for k in reversed(self.order) if k not in pinned)

    monkeypatch.setitem(POLICIES, "mru", MostRecentlyUsed)
    # one layer, top-1, 2 slots, 0 1 2 0 1: MRU evicts 1 for 2 and hits 0 (as Belady does); LRU hits nothing
    trace = make_trace(torch.tensor([0, 1, 2, 0, 1]).view(5, 1, 1), 3)
    # workers=2 would spawn processes that do not know "mru": the sweep stays in this one
    results = {r.policy: r.hits for r in sweep(trace, policies=["lru", "mru"], capacities=[2], workers=2)}
    assert results == {"belady": 1, "lru": 0, "mru": 1}


def test_random_replay_on_a_trace_where_every_choice_scores_the_same():
    # 0 1 2 2 2 with 2 slots: 2 evicts 0 or 1, whichever the draw picks, then hits twice; and 0 1 0 1 never evicts
    for seed in range(5):
        assert replay(make_trace(torch.tensor([0, 1, 2, 2, 2]).view(5, 1, 1), 3), "random", 2, seed=seed).hits == 2
        assert replay(make_trace(torch.tensor([0, 1, 0, 1]).view(4, 1, 1), 2), "random", 2, seed=seed).hits == 2


@pytest.mark.parametrize("policy,predictor", [("lru", "none"), ("lfu", "none"), ("fifo", "none"), ("random", "none"),
                                              ("lru", "gate"), ("lfu", "transition"), ("lru", "hybrid")])
def test_a_replay_counts_what_the_live_runtime_counted(policy, predictor):
    """What `offload-moe profile` reports is what the runtime does. A trace recorded one token per forward
    pass (a one-token prompt, then greedy decoding) and replayed through the same policy, capacity and
    predictor gives exactly the hits, misses, evictions and prefetches the live cache counted while recording
    it, layer by layer."""
    import offload_moe
    from offload_moe.traces import record_trace

    model = offload_moe.load(offload_moe.demo_model_path(), cache_experts=24, policy=policy, prefetch=predictor,
                             progress=False)
    # Reads run inline, so that each prefetch has landed when the next layer starts: the case the replay models.
    # With reader threads, one still in flight then stays pinned a little longer (or a queued one is dropped),
    # and the live counts can move by an expert or two from run to run.
    model.offload.cache.mover.pool.submit = _inline
    # from <|bos|> the bundled model writes a task prompt: 55 distinct experts in 48 steps, so slots are evicted
    trace = record_trace(model, [torch.tensor([0])], source="test", max_new_tokens=48, predict_margin=1)
    live = model.offload.stats()
    model.offload.close()
    replayed = replay(trace, policy, 24, predictor=predictor, margin=1)
    assert replayed.requests == live["hits"] + live["misses"] == 48 * 6 * 2
    assert live["evictions"] > 0
    assert (replayed.hits, replayed.misses, replayed.evictions) == (live["hits"], live["misses"], live["evictions"])
    assert (replayed.prefetch_issued, replayed.prefetch_used) == (live["prefetch_issued"], live["prefetch_used"])
    assert replayed.per_layer == {layer: (c["hits"], c["misses"]) for layer, c in live["per_layer"].items()}


def _slow_reads(mover, seconds: float, seed: int = 0) -> None:
    """Each read of ``mover`` first sleeps up to ``seconds`` (a random share): loads land late and out of order."""
    import random
    import threading

    draw, lock, read = random.Random(seed), threading.Lock(), mover._read

    def slow(*args):
        with lock:
            pause = draw.uniform(0, seconds)
        time.sleep(pause)
        return read(*args)

    mover._read = slow


def _threaded_live_and_replayed(policy: str, predictor: str, *, io: str, slow: float = 0.0):
    """Record 48 decoded tokens of the demo model on 2 reader threads (24 slots of 96), then replay the trace
    through the reference engine on 2 reader threads; the per-layer counters and prefetch counts of both."""
    import offload_moe
    from offload_moe.prefetch import Prefetcher
    from offload_moe.profiling import drive, replay_predictor
    from offload_moe.policies import make_policy
    from offload_moe.profiling.replays import replay_cache, replay_slots
    from offload_moe.traces import record_trace

    model = offload_moe.load(offload_moe.demo_model_path(), cache_experts=24, policy=policy, prefetch=predictor,
                             readers=2, io=io, progress=False)
    if slow:
        _slow_reads(model.offload.cache.mover, slow)
    try:
        trace = record_trace(model, [torch.tensor([0])], source="test", max_new_tokens=48, predict_margin=1)
        live = model.offload.stats()
    finally:
        model.offload.close()
    replayed = replay(trace, policy, 24, predictor=predictor, margin=1, readers=2)
    cache = replay_cache(replay_slots(trace, 24), make_policy(policy), readers=2)
    prefetcher = Prefetcher(replay_predictor(trace, predictor, 1), trace.layers, cache) if predictor != "none" else None
    try:
        drive(trace, cache, prefetcher)
        reference = {**vars(cache.flow), "per_layer": {layer: c.as_dict() for layer, c in cache.residency.per_layer.items()}}
    finally:
        cache.close()
    return live, replayed, reference


COUNTED = ("hits", "misses", "evictions")
FLOW = ("prefetch_issued", "prefetch_used", "prefetch_wasted")
QUICK = {("lru", "gate"), ("lfu", "transition"), ("fifo", "hybrid"), ("random", "none")}  # every policy and predictor


@pytest.mark.parametrize("policy,predictor", [
    pytest.param(policy, predictor, marks=() if (policy, predictor) in QUICK else pytest.mark.slow)
    for policy in ("lru", "lfu", "fifo", "random") for predictor in ("none", "gate", "transition", "hybrid")])
def test_a_replay_counts_what_the_threaded_runtime_counted(policy, predictor):
    """Live reads on 2 reader threads (buffered, real files), replayed with a ``NullMover`` on 2 reader threads:
    every hit, miss and eviction, layer by layer, and every prefetch issued, used and wasted, are equal. The
    cache's books depend on the sequence of calls alone, never on when a read lands (``ExpertCache``)."""
    live, replayed, reference = _threaded_live_and_replayed(policy, predictor, io="buffered")
    assert replayed.requests == live["hits"] + live["misses"] == 48 * 6 * 2
    assert live["misses"] > 0 and live["evictions"] > 0
    assert (replayed.prefetch_issued > 0) == (predictor != "none")
    assert (replayed.hits, replayed.misses, replayed.evictions) == (live["hits"], live["misses"], live["evictions"])
    assert (replayed.prefetch_issued, replayed.prefetch_used) == (live["prefetch_issued"], live["prefetch_used"])
    assert replayed.per_layer == {layer: (c["hits"], c["misses"]) for layer, c in live["per_layer"].items()}
    layers = {layer: tuple(c[n] for n in COUNTED) for layer, c in live["per_layer"].items()}
    assert layers == {layer: tuple(c[n] for n in COUNTED) for layer, c in reference["per_layer"].items()}
    assert tuple(live[n] for n in FLOW) == tuple(reference[n] for n in FLOW)


@pytest.mark.parametrize("policy,predictor,io", [("lru", "gate", "buffered"), ("random", "hybrid", "direct"),
                                                 ("lfu", "transition", "direct"), ("fifo", "gate", "buffered")])
def test_late_and_reordered_landings_change_no_count(policy, predictor, io):
    """Reads that land up to 20 ms late, in random order, so that prefetches are still in flight (or queued and
    called off) when their layer runs and victims are still being written: the counts equal the replay's."""
    live, replayed, reference = _threaded_live_and_replayed(policy, predictor, io=io, slow=0.02)
    assert live["inflight_hits"] > 0  # some prefetches had not landed when their layer asked for them
    assert (replayed.hits, replayed.misses, replayed.evictions) == (live["hits"], live["misses"], live["evictions"])
    assert (replayed.prefetch_issued, replayed.prefetch_used) == (live["prefetch_issued"], live["prefetch_used"])
    layers = {layer: tuple(c[n] for n in COUNTED) for layer, c in live["per_layer"].items()}
    assert layers == {layer: tuple(c[n] for n in COUNTED) for layer, c in reference["per_layer"].items()}
    assert tuple(live[n] for n in FLOW) == tuple(reference[n] for n in FLOW)
    assert live["load_failures"] == live["prefetch_failures"] == 0


def test_an_unknown_engine_is_refused():
    trace = skewed_trace(tokens=5)
    with pytest.raises(ConfigError, match="engine='exact' is not a replay engine; use one of reference, fast"):
        replay(trace, "lru", 4, engine="exact")
    with pytest.raises(ConfigError, match="engine='exact'"):
        sweep(trace, policies=["lru"], capacities=[4], engine="exact")


def _inline(fn, *args, urgent=True):
    from concurrent.futures import Future

    future = Future()
    try:
        future.set_result(fn(*args))
    except BaseException as e:
        future.set_exception(e)
    return future


# ---------------------------------------------------------------- bounded by the data; results as one set


def fail_second_fsync(monkeypatch) -> None:
    """The disk fills up while the second file of a set (results.csv) is written."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr("offload_moe.atomic.os.fsync", fsync)


def test_a_full_disk_leaves_no_results_json_without_results_csv(tmp_path, monkeypatch):
    from offload_moe.profiling import write_results

    trace = skewed_trace(tokens=20)
    results = sweep(trace, policies=["lru"], capacities=[4])
    fail_second_fsync(monkeypatch)
    with pytest.raises(OutputError, match=r"results\.csv: No space left on device"):
        write_results(results, trace, tmp_path, plots=False)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_keeps_the_previous_complete_results(tmp_path, monkeypatch):
    from offload_moe.profiling import write_results

    trace = skewed_trace(tokens=20)
    before = write_results(sweep(trace, policies=["lru"], capacities=[4]), trace, tmp_path, plots=False)
    saved = {name: path.read_bytes() for name, path in before.items()}
    fail_second_fsync(monkeypatch)
    with pytest.raises(OutputError):
        write_results(sweep(trace, policies=["lru", "fifo"], capacities=[4, 8]), trace, tmp_path, plots=False)
    assert {name: path.read_bytes() for name, path in before.items()} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]


def test_profile_on_a_full_disk_leaves_no_output_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from offload_moe.cli import app
    from offload_moe.traces import save_trace

    trace_file = save_trace(skewed_trace(tokens=20), tmp_path / "t.safetensors")
    fail_second_fsync(monkeypatch)
    out = tmp_path / "new" / "results"
    result = CliRunner().invoke(app, ["profile", "--trace", str(trace_file), "--policies", "lru", "--capacities", "4",
                                      "--no-plots", "--out", str(out)])
    assert isinstance(result.exception, OutputError) and "No space left" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_trace_synth_on_a_full_disk_leaves_no_output_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from offload_moe.cli import app

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("offload_moe.atomic.os.fsync", full)
    result = CliRunner().invoke(app, ["trace", "synth", "--tokens", "8", "--layers", "2", "--experts", "4", "--top-k", "2",
                                      "--out", str(tmp_path / "new" / "t.safetensors")])
    assert isinstance(result.exception, OutputError) and "No space left" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_a_huge_num_experts_in_the_metadata_allocates_nothing_in_proportion():
    import tracemalloc

    from offload_moe.profiling import predictions

    small = skewed_trace(tokens=200, layers=3, experts=8)
    huge = make_trace(small.experts, 32767)  # the same routing, claimed to come from a model of 32767 experts
    # the small trace's first: they also load numba's kernels into this process, which is not what is measured
    small_named, small_misses = predictions(small, "transition"), replay(small, "lru", 24).misses
    tracemalloc.start()
    try:
        named = predictions(huge, "transition")
        counted = replay(huge, "lru", 10**6)  # e.g. 50% of 3 x 32767 slots is asked for
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20
    assert named == small_named
    assert counted.misses == small_misses  # every key fits in both


def test_no_heatmap_is_drawn_for_more_experts_than_it_can_show(tmp_path):
    from offload_moe.profiling import write_results

    trace = make_trace(skewed_trace(tokens=20).experts, 4000)
    written = write_results(sweep(trace, policies=["lru"], capacities=[4]), trace, tmp_path)
    assert "4 layers x 4000 experts is more than a heatmap shows" in written["heatmap"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hit_rate.png", "results.csv", "results.json", "tradeoff.png"]


def test_the_trace_to_profile_is_chosen_by_the_library_as_the_command_chooses_it(tmp_path):
    # The CLI's `profile` holds no choice the API lacks: reference trace, a trace file, or a recording.
    from offload_moe import demo_model_path
    from offload_moe.profiling import profile_capacities, reference_trace_path, trace_to_profile
    from offload_moe.traces import load_trace, save_trace

    reference = trace_to_profile()
    assert torch.equal(reference.experts, load_trace(reference_trace_path()).experts)
    assert profile_capacities("12.5%,25%", reference) == [12, 24]
    path = save_trace(reference.first(16), tmp_path / "t.safetensors")
    assert trace_to_profile(trace_file=path).num_tokens == 16
    recorded = trace_to_profile(demo_model_path(), prompts=["def add(a, b):"], margin=2, source="one prompt")
    assert recorded.layers == reference.layers and recorded.prediction_margin == 2
    assert recorded.metadata["source"] == "one prompt"
    with pytest.raises(ConfigError, match="not both"):
        trace_to_profile(demo_model_path(), trace_file=path)
    with pytest.raises(ConfigError, match="--prompts needs MODEL"):
        trace_to_profile(prompts=["x"])
    with pytest.raises(ConfigError, match="--prompts needs MODEL"):  # a file given, left unread without MODEL
        trace_to_profile(prompts_file=tmp_path / "no-such-prompts.txt")
    with pytest.raises(ConfigError, match="give --prompts"):
        trace_to_profile(demo_model_path())
