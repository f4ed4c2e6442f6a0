"""Prefetch predictors, the warm host tier and asynchronous loads: output unchanged, stats add up."""

from __future__ import annotations

import gc
import re
import threading

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.errors import BudgetError, ConfigError
from offload_moe.prefetch import GatePredictor, TransitionPredictor, make_predictor

NEW = 16


def reference_tokens(folder, prompt):
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref(prompt).logits
    return logits, ref.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


def check_parity(model, prompt, want_logits, want_tokens):
    with torch.no_grad():
        got = model(prompt).logits
    assert ((want_logits - got).abs().max() / want_logits.abs().max()).item() <= 1e-5
    assert torch.equal(model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False), want_tokens)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("settings", [
    dict(prefetch="none"),
    dict(prefetch="gate"),
    dict(prefetch="gate", prefetch_depth=2, prefetch_margin=2),
    dict(prefetch="transition"),
    dict(prefetch="hybrid", prefetch_margin=1, readers=1),
    dict(prefetch="gate", host_memory=10**9),  # warm tier holds every expert: filled at load
    dict(prefetch="transition", host_memory="0.0001GiB", io="dontneed"),  # a few host slots
])
def test_output_unchanged_with_prefetch_and_tiers(family, settings, model_dir, prompt):
    folder = model_dir(family)
    logits, tokens = reference_tokens(folder, prompt)
    for capacity in (2, 5):
        model = offload_moe.load(folder, cache_experts=capacity, dtype="float32", progress=False, **settings)
        check_parity(model, prompt, logits, tokens)
        model.offload.close()


def test_stats_add_up(model_dir, prompt):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=4, dtype="float32", progress=False, prefetch="gate",
                             prefetch_margin=1)
    model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    model.offload.cache.drain()
    s = model.offload.stats()
    requests = sum(c["hits"] + c["misses"] for c in s["per_layer"].values())
    assert s["hits"] + s["misses"] == requests > 0
    assert 0 <= s["inflight_hits"] <= s["hits"]
    assert s["prefetch_issued"] > 0
    assert s["prefetch_used"] + s["prefetch_wasted"] <= s["prefetch_issued"]
    assert s["prefetch_cancelled"] <= s["prefetch_issued"] - s["prefetch_used"]  # never read: a layer never asked
    loads = s["misses"] + s["prefetch_issued"] - s["prefetch_cancelled"]  # a cancelled prefetch never read
    assert s["bytes_loaded"] == loads * s["expert_bytes"]
    assert s["bytes_moved"]["disk"] == loads * s["expert_bytes"]  # fp32 checkpoint, fp32 slots
    assert s["bytes_moved"]["host_to_device"] == 0  # no warm tier
    assert s["tokens"] == prompt.shape[1] + NEW - 1  # prefill, then one token per decode step
    assert s["stall_seconds"] >= 0 and s["stall_per_token"] == pytest.approx(s["stall_seconds"] / s["tokens"])
    assert s["prefetch_recall"] == pytest.approx(s["hits"] / requests)
    assert 0 <= s["prediction_recall"] <= 1 and 0 <= s["prediction_precision"] <= 1
    assert s["bandwidth"]["disk"] > 0
    model.offload.reset_stats()
    s = model.offload.stats()
    assert s["hits"] == s["misses"] == s["prefetch_issued"] == s["tokens"] == 0


def test_full_host_tier_is_filled_at_load_and_serves_every_miss(model_dir, prompt):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", host_memory="1GiB",
                             prefetch="none", progress=False)
    s = model.offload.stats()
    assert s["host"]["resident_experts"] == s["total_experts"] == s["host"]["capacity_experts"]
    model.offload.reset_stats()
    model.generate(prompt, max_new_tokens=8, do_sample=False)
    s = model.offload.stats()
    assert s["misses"] > 0 and s["bytes_moved"]["disk"] == 0
    assert s["bytes_moved"]["host_to_device"] == s["misses"] * s["expert_bytes"]
    assert s["host"]["misses"] == 0 and s["host"]["hits"] == s["misses"]


def test_partial_host_tier_keeps_its_budget(model_dir, prompt):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", host_memory=3 * 18432,
                             prefetch="none", progress=False)
    model.generate(prompt, max_new_tokens=8, do_sample=False)
    model.offload.cache.drain()
    s = model.offload.stats()
    host = model.offload.cache.host
    assert s["host"]["capacity_experts"] == 3 and s["host"]["resident_experts"] <= 3
    assert s["host"]["hits"] + s["host"]["misses"] == s["misses"]
    assert s["bytes_moved"]["disk"] == s["host"]["misses"] * s["expert_bytes"]
    host.residency.check()
    assert not host.residency.pins  # every host slot is released once its copy landed


def test_reader_threads_and_files_are_released(model_dir, prompt):
    def readers():
        gc.collect()  # models of earlier tests stop their readers when collected
        return [t for t in threading.enumerate() if t.name.startswith("offload-moe-reader")]

    before = len(readers())
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", readers=3, progress=False)
    model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert len(readers()) > before
    model.offload.close()
    assert len(readers()) == before
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", progress=False)
    model(prompt)
    del model
    gc.collect()
    assert len(readers()) == before  # deleting the model shuts its readers down too


def test_prefetch_never_takes_a_slot_the_layer_needs(model_dir):
    """With two slots, deep wide prefetch competes hard for slots; every layer still computes what it needs."""
    model = offload_moe.load(model_dir("qwen3_moe"), cache_experts=2, dtype="float32", prefetch="gate",
                             prefetch_depth=2, prefetch_margin=3, progress=False)
    cache = model.offload.cache
    admit = cache.residency.admit

    def checked_admit(key, *args):
        slot, evicted = admit(key, *args)
        assert evicted is None or not cache.residency.is_pinned(evicted)
        return slot, evicted

    cache.residency.admit = checked_admit
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    model.generate(ids, max_new_tokens=10, do_sample=False)
    cache.drain()
    cache.residency.check()
    assert model.offload.stats()["prefetch_issued"] > 0


def test_gate_predictor_takes_the_next_routers_top_k_plus_margin():
    torch.manual_seed(0)
    routers = [nn.Linear(8, 6, bias=False), nn.Linear(8, 6, bias=False), None]
    p = GatePredictor(routers, top_k=2, margin=1, depth=2)
    hidden = torch.randn(5, 8)
    out = p.predict_device(0, hidden)
    assert sorted(out) == [1]  # layer 2 has no router
    want = (hidden @ routers[1].weight.T).topk(3, dim=-1).indices
    assert torch.equal(out[1], want)
    routers[1].e_score_correction_bias = torch.zeros(6)
    routers[1].e_score_correction_bias[5] = 10.0
    assert (p.predict_device(0, hidden)[1][:, 0] == 5).all()  # DeepSeek-V3-style selection bias is honoured


def test_transition_predictor_learns_a_fixed_pattern():
    p = TransitionPredictor(layers=3, num_experts=4, top_k=1, margin=0, depth=2)
    for _ in range(3):
        for pos in range(3):
            e = torch.tensor([[(i + pos) % 4] for i in range(4)])  # token i uses expert i+pos at layer pos
            p.observe(pos, e)
    routing = torch.tensor([[0], [1], [2], [3]])
    out = p.predict_host(0, routing)
    assert torch.equal(out[1].flatten(), torch.tensor([1, 2, 3, 0]))
    assert torch.equal(out[2].flatten(), torch.tensor([2, 3, 0, 1]))
    assert TransitionPredictor(2, 4, 1).predict_host(0, routing) == {}  # nothing observed yet: no guess


def test_bad_prefetch_settings(model_dir):
    folder = model_dir("mixtral")
    with pytest.raises(ConfigError, match="gate"):
        offload_moe.load(folder, cache_experts=2, prefetch="oracle", progress=False)
    with pytest.raises(ConfigError, match="prefetch_depth"):
        make_predictor("gate", routers=[None], num_experts=4, top_k=2, depth=0)
    with pytest.raises(ConfigError, match="io="):
        offload_moe.load(folder, cache_experts=2, io="aio", progress=False)
    with pytest.raises(BudgetError, match="host_memory"):
        offload_moe.load(folder, cache_experts=2, host_memory="1KiB", progress=False)
    with pytest.raises(ConfigError, match="readers"):
        offload_moe.load(folder, cache_experts=2, readers=0, progress=False)


def test_buffers_are_freed_when_the_model_is_deleted(model_dir, prompt):
    import weakref

    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", host_memory=3 * 18432,
                             progress=False)
    model.generate(prompt, max_new_tokens=4, do_sample=False)
    cache = model.offload.cache
    buffers = [weakref.ref(cache.pool.buffer), weakref.ref(cache.host.pool.buffer)]
    del model, cache
    gc.collect()
    assert all(ref() is None for ref in buffers)


def test_pooled_row_is_the_runtime_ranking():
    import numpy as np

    from offload_moe.prefetch import _pooled, pooled_row

    rng = np.random.default_rng(1)
    for _ in range(200):
        gate, transition = rng.permutation(8)[:3], rng.permutation(8)[: rng.integers(1, 4)]
        assert pooled_row([gate.tolist(), transition.tolist()]) == _pooled([gate[None], transition[None]])


def test_hybrid_prefetch_names_what_the_replay_of_its_trace_names(model_dir):
    """Decoding with prefetch='hybrid', the runtime's guesses equal ``profiling.predictions(trace, 'hybrid')``."""
    from offload_moe.profiling import predictions
    from offload_moe.traces import record_trace

    model = offload_moe.load(model_dir("mixtral"), cache_experts=4, dtype="float32", prefetch="hybrid",
                             prefetch_margin=1, progress=False)
    prefetcher = model.offload.prefetcher
    named = []  # what the prefetcher queued at each layer call, best first
    original = prefetcher.after_routing

    def spy(pos, routing, device_predictions):
        loads = original(pos, routing, device_predictions)
        if pos + 1 < 3:
            named.append(loads[0][1])
        return loads

    prefetcher.after_routing = spy
    trace = record_trace(model, [torch.tensor([5, 17, 3, 40])], source="test", predict_margin=1, max_new_tokens=6)
    model.offload.close()
    replayed = predictions(trace, "hybrid", margin=1)
    decode = named[2:]  # after the prefill's two predicting layers, one entry per decoding step and layer
    assert len(decode) == 5 * 2
    for step in range(5):
        for pos in range(2):
            assert decode[step * 2 + pos] == replayed[4 + step][pos], (step, pos)
    assert model.offload.stats()["prefetch"] == "hybrid"


# ---------------------------------------------------------------- reader priorities


def test_urgent_reads_go_before_queued_prefetches_and_hurry_moves_one_up():
    from offload_moe.transfer import ReaderPool

    pool = ReaderPool(1)
    gate, order = threading.Event(), []
    blocker = pool.submit(gate.wait)  # the one reader is busy until the gate opens
    later = [pool.submit(order.append, name, urgent=False) for name in ("prefetch a", "prefetch b", "prefetch c")]
    pool.submit(order.append, "needed now")
    pool.hurry(later[2])
    gate.set()
    for f in [blocker, *later]:
        f.result(timeout=5)
    assert order == ["needed now", "prefetch c", "prefetch a", "prefetch b"]
    pool.shutdown()
    assert not any(t.is_alive() for t in pool._threads)


def test_reader_pool_shutdown_cancels_what_has_not_started_and_reports_errors():
    from offload_moe.transfer import ReaderPool

    pool = ReaderPool(1)
    gate = threading.Event()
    running = pool.submit(gate.wait)
    queued = pool.submit(lambda: 1, urgent=False)
    failing = ReaderPool(1).submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)
    gate.set()
    pool.shutdown(wait=True)
    assert running.result() is True and (queued.cancelled() or queued.result() == 1)
    with pytest.raises(offload_moe.ExpertLoadError, match="closed"):
        pool.submit(lambda: 1)


def test_a_layer_that_needs_a_queued_prefetch_hurries_it(model_dir, prompt):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=6, dtype="float32", prefetch="transition",
                             prefetch_margin=2, progress=False)
    import time

    mover, store = model.offload.cache.mover, model.offload.cache.store
    read = store.read_piece
    store.read_piece = lambda *a, **k: (time.sleep(0.005), read(*a, **k))[1]  # slow reads: prefetches are still queued
    hurried = []
    original = mover.hurry
    mover.hurry = lambda ticket: (hurried.append(ticket), original(ticket))
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=12, do_sample=False)
    s = model.offload.stats()
    model.offload.close()
    assert s["inflight_hits"] == len(hurried) > 0  # every in-flight hit asked for its read to go next


def test_prefetches_a_layer_ran_without_are_cancelled_before_their_read(model_dir, prompt):
    """With slow reads, prefetches queue behind needed loads; those their layer did not need are dropped unread,
    and the output still matches the model with every expert resident."""
    import time

    folder = model_dir("mixtral")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = reference.generate(prompt, max_new_tokens=10, do_sample=False)
    model = offload_moe.load(folder, cache_experts=6, dtype="float32", prefetch="transition", prefetch_margin=2,
                             readers=1, progress=False)
    cache = model.offload.cache
    read = cache.store.read_piece
    cache.store.read_piece = lambda *a, **k: (time.sleep(0.003), read(*a, **k))[1]
    with torch.inference_mode():
        got = model.generate(prompt, max_new_tokens=10, do_sample=False)
    cache.drain()
    s = model.offload.stats()
    cache.residency.check()
    model.offload.close()
    assert torch.equal(got, want)
    assert s["prefetch_cancelled"] > 0 and s["load_failures"] == 0 and s["prefetch_failures"] == 0
    assert s["bytes_loaded"] == s["expert_bytes"] * (s["misses"] + s["prefetch_issued"] - s["prefetch_cancelled"])


@pytest.mark.parametrize("options, message", [
    (dict(margin=True), "prefetch_margin=True must be a whole number, 0 or more"),
    (dict(margin="2"), "prefetch_margin='2' must be a whole number"),
    (dict(margin=-1), "prefetch_margin=-1 must be 0 or more"),
    (dict(depth=1.5), "prefetch_depth=1.5 must be a whole number, at least 1 layer"),
])
def test_make_predictor_checks_margin_and_depth_as_offload_config_does(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_predictor("gate", routers=[nn.Linear(4, 4)], num_experts=4, top_k=2, **options)
    key = {"margin": "prefetch_margin", "depth": "prefetch_depth"}
    with pytest.raises(ConfigError, match=re.escape(message)):
        offload_moe.OffloadConfig(**{key[k]: v for k, v in options.items()})


def test_load_takes_a_predictor_object_as_offload_experts_does(model_dir, prompt):
    from offload_moe.prefetch import Predictor

    class NextLayerAll(Predictor):  # names every expert of the next layer
        name = "next-layer-all"

        def __init__(self):
            self.seen = []

        def predict_host(self, pos, routing):
            return {pos + 1: torch.arange(4).expand(routing.shape[0], 4)} if pos + 1 < 3 else {}

        def observe(self, pos, routing):
            self.seen.append(pos)

    predictor = NextLayerAll()
    model = offload_moe.load(model_dir("mixtral"), cache_experts=6, prefetch=predictor, progress=False)
    try:
        model(prompt)
        s = model.offload.stats()
    finally:
        model.offload.close()
    assert s["prefetch"] == "next-layer-all" and s["prefetch_issued"] > 0 and set(predictor.seen) == {0, 1, 2}
