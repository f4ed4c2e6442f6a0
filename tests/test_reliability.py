"""Faults in expert reads and transfers, hung reads, concurrent callers: clear errors, nothing corrupted."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.errors import ExpertLoadError
from faults import Faults

PATTERN = {
    "eio": r"expert \d+ of layer \d+ .*model\.safetensors.*Input/output error",
    "short": r"expert \d+ of layer \d+ .*model\.safetensors.*truncated",
    "hang": r"expert \d+ of layer \d+ .*model\.safetensors.*read_timeout",
    "oom": r"expert \d+ of layer \d+ .*model\.safetensors.*out of memory",
}


def relative_error(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


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
def test_fault_gives_clear_error_and_recovery(mode, prefetch, io, reference, monkeypatch):
    folder, ids, want = reference
    faults = Faults(monkeypatch)
    host = 3 * 18432 if mode == "oom" else None  # the injected OOM strikes the host-to-device copy
    model = offload_moe.load(folder, cache_experts=3, dtype="float32", prefetch=prefetch, io=io, host_memory=host,
                             read_timeout=0.5, progress=False)
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


def test_hung_read_cannot_overwrite_a_reused_slot(reference, monkeypatch):
    """A read that timed out writes into its slot when it finally ends: that slot was quarantined meanwhile."""
    folder, ids, want = reference
    faults = Faults(monkeypatch)
    model = offload_moe.load(folder, cache_experts=2, dtype="float32", prefetch="none", io="buffered",
                             read_timeout=0.2, progress=False)
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


def test_two_threads_generate_one_after_the_other(reference):
    folder, ids, _ = reference
    model = offload_moe.load(folder, cache_experts=2, dtype="float32", prefetch="gate", progress=False)
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


def test_invariants_hold_at_every_layer_under_heavy_prefetch(model_dir):
    """Many concurrent prefetches racing evictions: the cache invariants hold after every layer."""
    model = offload_moe.load(model_dir("qwen3_moe"), cache_experts=3, dtype="float32", prefetch="gate",
                             prefetch_depth=2, prefetch_margin=3, readers=4, progress=False)
    cache = model.offload.cache
    checks = []

    def check(module, args, output):
        cache.residency.check()
        assert not cache.residency.pins.keys() - set(cache._inflight) - cache._flying
        checks.append(1)

    for m in model.offload.modules:
        m.register_forward_hook(check)
    ids = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(5))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert len(checks) >= 3 * 20
    assert model.offload.stats()["prefetch_issued"] > 0
