"""Faults in expert reads and transfers, hung reads, concurrent callers: clear errors, nothing corrupted."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.errors import ExpertLoadError
from conftest import VERBS
from faults import Faults
from tiny_models import relative_error

PATTERN = {  # the file is the checkpoint's (load) or the one save_experts wrote (offload_experts)
    "eio": r"expert \d+ of layer \d+ .*\.safetensors.*Input/output error",
    "short": r"expert \d+ of layer \d+ .*\.safetensors.*truncated",
    "hang": r"expert \d+ of layer \d+ .*\.safetensors.*read_timeout",
    "oom": r"expert \d+ of layer \d+ .*\.safetensors.*out of memory",
}


@pytest.fixture(scope="module")
def reference(model_dir):
    folder = model_dir("mixtral")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return folder, ids, ref(ids).logits


@pytest.mark.parametrize("mode", ["eio", "short", "hang", "oom"])
@pytest.mark.parametrize("prefetch", ["none", "gate"])
@pytest.mark.parametrize("io", ["buffered", "direct"])
@pytest.mark.parametrize("verb", VERBS)
def test_fault_gives_clear_error_and_recovery(verb, mode, prefetch, io, reference, offloaded, monkeypatch):
    folder, ids, want = reference
    faults = Faults(monkeypatch)
    host = 3 * 18432 if mode == "oom" else None  # the injected OOM strikes the host-to-device copy
    model = offloaded(verb, cache_experts=3, prefetch=prefetch, io=io, host_memory=host, read_timeout=0.5)
    cache = model.offload.cache
    faults.arm(mode)
    with pytest.raises(ExpertLoadError, match=PATTERN[mode]):
        with torch.no_grad():
            model(ids)
    assert faults.reads > 0
    # the failed slot is never resident, and nothing is pinned by the failed forward
    assert not any(key in cache._inflight and not cache.residency.is_pinned(key) for key in cache.residency.slot_of)
    faults.clear()
    cache.drain()
    cache.residency.check()
    assert not cache.residency.pins and not cache.residency.quarantined
    assert model.offload.stats()["load_failures"] >= 1
    with torch.no_grad():
        got = model(ids).logits
    assert relative_error(want, got) <= 1e-5  # no stale or partial bytes were used
    model.offload.close()


@pytest.mark.parametrize("verb", VERBS)
def test_hung_read_cannot_overwrite_a_reused_slot(verb, reference, offloaded, monkeypatch):
    """A read that timed out writes into its slot when it finally ends: that slot was quarantined meanwhile."""
    folder, ids, want = reference
    faults = Faults(monkeypatch)
    model = offloaded(verb, cache_experts=2, prefetch="none", io="buffered", read_timeout=0.2)
    cache = model.offload.cache
    faults.arm("hang")
    with pytest.raises(ExpertLoadError, match="read_timeout"):
        with torch.no_grad():
            model(ids)
    assert cache.residency.quarantined and cache.stuck_reads() == 1
    faults.mode = None  # new reads work; the hung one is still stuck
    with pytest.raises(Exception):  # one slot of two is quarantined: a layer needing two experts cannot run
        with torch.no_grad():
            model(ids)
    faults.release.set()  # the stuck read ends and writes into its (quarantined) slot
    time.sleep(0.1)
    cache.drain()
    assert not cache.residency.quarantined
    with torch.no_grad():
        assert relative_error(want, model(ids).logits) <= 1e-5
    model.offload.close()


@pytest.mark.parametrize("verb", VERBS)
def test_two_threads_generate_one_after_the_other(verb, reference, offloaded):
    folder, ids, _ = reference
    model = offloaded(verb, cache_experts=2, prefetch="gate")
    want = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    results, errors = [], []
    active, overlaps = [0], []

    def enter(module, args):  # the base model runs inside the runtime's lock
        active[0] += 1
        overlaps.append(active[0] > 1)

    def leave(module, args, output):
        active[0] -= 1

    model.model.register_forward_pre_hook(enter)
    model.model.register_forward_hook(leave)

    def run():
        try:
            results.append(model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 4
    assert all(torch.equal(r, want) for r in results)
    assert overlaps and not any(overlaps)
    model.offload.cache.drain()
    model.offload.cache.residency.check()


@pytest.mark.parametrize("verb", VERBS)
def test_invariants_hold_at_every_layer_under_heavy_prefetch(verb, offloaded):
    """Many concurrent prefetches racing evictions: the cache invariants hold after every layer."""
    model = offloaded(verb, "qwen3_moe", cache_experts=3, prefetch="gate", prefetch_depth=2, prefetch_margin=3,
                      readers=4)
    cache = model.offload.cache
    checks = []

    def check(module, args, output):
        cache.residency.check()
        assert not cache.residency.pins.keys() - set(cache._inflight)
        checks.append(1)

    for m in model.offload.modules:
        m.register_forward_hook(check)
    ids = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(5))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert len(checks) >= 3 * 20
    assert model.offload.stats()["prefetch_issued"] > 0


def run_in_threads(call, xs, iterations: int) -> tuple[list, list]:
    """``call(x)`` for each of ``xs`` in its own thread, ``iterations`` times; returns (results, errors)."""
    results, errors = [[] for _ in xs], []
    start = threading.Barrier(len(xs))

    def work(i):
        try:
            start.wait()
            with torch.no_grad():  # grad mode is per thread
                for _ in range(iterations):
                    results[i].append(call(xs[i]))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    return results, errors


@pytest.mark.parametrize("settings", [dict(io="buffered", prefetch="gate"), dict(io="mmap", prefetch="none")],
                         ids=["buffered-gate", "mmap"])
@pytest.mark.parametrize("verb", VERBS)
def test_threads_calling_the_inner_model_share_the_cache_safely(verb, settings, offloaded):
    """model.model(x) bypasses the top-level forward: the experts modules take the cache's lock themselves."""
    model = offloaded(verb, cache_experts=2, **settings)
    xs = [torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    with torch.no_grad():
        want = [model.model(x).last_hidden_state for x in xs]
    results, errors = run_in_threads(lambda x: model.model(x).last_hidden_state, xs, iterations=12)
    assert not errors, errors[0]
    for i, outs in enumerate(results):
        assert len(outs) == 12 and all(torch.equal(out, want[i]) for out in outs)
    cache = model.offload.cache
    cache.drain()
    cache.residency.check()
    assert not cache.residency.pins
    model.offload.close()


@pytest.mark.parametrize("replace_forward", [False, True], ids=["own_forward", "replace_forward"])
def test_threads_calling_an_offload_experts_model_share_the_cache_safely(replace_forward):
    from test_generic import inputs, make_model

    model = make_model()
    handle = offload_moe.offload_experts(model, cache_experts=2, replace_forward=replace_forward)
    xs = [inputs(seed) for seed in range(4)]
    with torch.no_grad():
        want = [model(x) for x in xs]
    results, errors = run_in_threads(model, xs, iterations=15)
    assert not errors, errors[0]
    for i, outs in enumerate(results):
        assert len(outs) == 15 and all(torch.equal(out, want[i]) for out in outs)
    handle.cache.drain()
    handle.cache.residency.check()
    assert not handle.cache.residency.pins
    handle.close()


@pytest.mark.parametrize("verb", VERBS)
def test_close_while_threads_use_the_model_waits_for_their_layer_then_stops_them(verb, offloaded):
    """close() takes the cache's lock: it waits for the layer being computed, never deadlocks with the
    reader threads, and every later layer raises ModelClosedError."""
    from offload_moe.errors import ModelClosedError

    model = offloaded(verb, cache_experts=2, prefetch="gate", read_timeout=5)
    xs = [torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    running = threading.Barrier(len(xs) + 1)
    errors = []

    def work(x):
        running.wait()
        try:
            with torch.no_grad():
                while True:
                    model.model(x)
        except ModelClosedError:
            pass
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(x,)) for x in xs]
    for t in threads:
        t.start()
    running.wait()
    time.sleep(0.2)
    model.offload.close()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert not any(t.is_alive() for t in model.offload.cache.mover.pool.threads())
