"""The offloaded experts module: resident experts first, each expert loaded once per layer, no eviction of what a layer still needs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.errors import ExpertLoadError


class Spy:
    """Records, per layer call, which experts were hits, which were loaded, the compute order and the evictions."""

    def __init__(self, model):
        self.cache = cache = model.offload.cache
        self.calls: list[dict] = []
        self.loading = False
        acquire, admit, weights, start = cache._acquire, cache.residency.admit, cache.pool.weights, cache._start

        def spy_acquire(layer, experts):
            hits, misses = acquire(layer, experts)
            self.calls.append({"layer": layer, "needed": list(experts), "hits": list(hits),
                               "computed": [], "loaded": [], "bad_evictions": []})
            return hits, misses

        def spy_admit(key, *args):
            slot, evicted = admit(key, *args)
            call = self.calls[-1]
            if key[0] == call["layer"]:  # not a prefetch for a later layer
                call["loaded"].append(key[1])
            if (evicted is not None and evicted[0] == call["layer"] and evicted[1] in call["needed"]
                    and evicted[1] not in call["computed"]):
                call["bad_evictions"].append(evicted)
            return slot, evicted

        def spy_start(layer, expert, *args, **kwargs):
            self.loading = True
            try:
                return start(layer, expert, *args, **kwargs)
            finally:
                self.loading = False

        def spy_weights(slot):  # what compute is handed: a slot's tensors as weights
            if not self.loading:
                self.calls[-1]["computed"].append(cache.residency.owner[slot][1])
            return weights(slot)

        cache._acquire, cache.residency.admit, cache.pool.weights, cache._start = spy_acquire, spy_admit, spy_weights, spy_start


@pytest.mark.parametrize("capacity", [2, 3, 5])
def test_resident_first_and_nothing_needed_is_evicted(model_dir, capacity):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=capacity, dtype="float32", progress=False)
    spy = Spy(model)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert spy.calls
    evictions = 0
    for call in spy.calls:
        hits = call["hits"]
        assert call["computed"][: len(hits)] == hits  # resident experts run first
        assert sorted(call["computed"]) == sorted(call["needed"])  # every needed expert runs exactly once
        assert len(call["loaded"]) == len(set(call["loaded"]))  # a batch loads an expert once per layer
        assert call["bad_evictions"] == []  # nothing this layer still needs was evicted
        evictions += len(call["loaded"])
    assert evictions > 0
    model.offload.cache.residency.check()


def test_prefill_loads_each_needed_expert_once_per_layer(model_dir):
    model = offload_moe.load(model_dir("olmoe"), cache_experts=2, dtype="float32", prefetch="none", progress=False)
    spy = Spy(model)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids)
    assert len(spy.calls) == 3
    for call in spy.calls:
        assert len(call["needed"]) == 4  # 40 tokens touch all 4 experts
        assert len(call["loaded"]) == len(call["needed"]) - len(call["hits"])
    stats = model.offload.stats()
    assert stats["misses"] == sum(len(c["loaded"]) for c in spy.calls)


@pytest.mark.parametrize("prefetch", ["none", "gate"])
def test_load_failure_is_clear_and_leaves_cache_consistent(model_dir, prompt, prefetch):
    """A failed read (foreground or background prefetch) raises at the layer that needs the expert, names it, and
    leaves no half-written slot resident; once the fault clears, output matches the reference again."""
    folder = model_dir("mixtral")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = offload_moe.load(folder, cache_experts=2, dtype="float32", prefetch=prefetch, progress=False)
    mover = model.offload.cache.mover
    real_read = mover._read

    def broken(layer, expert, views):
        for v in views.values():
            v.fill_(123.0)  # a half-written slot: must never be used
        raise OSError(5, "Input/output error")

    mover._read = broken
    with pytest.raises(ExpertLoadError, match=r"expert \d+ of layer 0 .*model.safetensors.*Input/output error"):
        model(prompt)
    residency = model.offload.cache.residency
    model.offload.cache.drain()
    residency.check()
    assert len(residency) == 0 and not residency.pins
    assert model.offload.stats()["load_failures"] >= 1
    mover._read = real_read
    with torch.no_grad():
        want, got = ref(prompt).logits, model(prompt).logits
    assert ((want - got).abs().max() / want.abs().max()).item() <= 1e-5


def test_the_layers_share_one_dequantization_buffer(model_dir):
    """Layers run one at a time, so one scratch buffer serves them all (sized to the largest weight, once)."""
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", progress=False)
    try:
        scratches = {id(m.kernel.scratch) for m in model.offload.modules}
        assert len(model.offload.modules) > 1 and len(scratches) == 1
    finally:
        model.offload.close()


def test_batched_decoding_recycles_a_steps_own_slots_and_loads_less():
    """Eight sequences decoded together on the bundled model (6 layers x 16 experts, 24 slots) ask for about 33
    experts a step: with the cache's rule for steps that outgrow it (``ExpertCache.recycle``) the same greedy
    tokens come out for fewer loads; without it LRU evicts, load by load, what the next layer needs."""
    ids = torch.randint(3, 4000, (8, 6), generator=torch.Generator().manual_seed(4))
    out, stats = {}, {}
    for recycle in (False, True):
        model = offload_moe.load(offload_moe.demo_model_path(), cache_experts=24, dtype="float32", progress=False)
        model.offload.cache.recycle = recycle
        out[recycle] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        stats[recycle] = model.offload.stats()
        model.offload.close()
    assert torch.equal(out[False], out[True])
    off, on = stats[False], stats[True]
    assert on["hits"] + on["misses"] == off["hits"] + off["misses"]  # the same experts asked for
    assert on["misses"] < 0.7 * off["misses"] and on["hits"] > off["hits"]
