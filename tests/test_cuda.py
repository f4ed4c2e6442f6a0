"""CUDA paths: slots on the device, pinned staging buffers reused, parity on the GPU. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.transfer import CudaMover, Mover

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_parity_on_cuda(family, model_dir, prompt):
    folder = model_dir(family)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to("cuda")
    model = offload_moe.load(folder, device="cuda", cache_experts=2, dtype="float32", progress=False)
    ids = prompt.to("cuda")
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert ((want - got).abs().max() / want.abs().max()).item() <= 1e-4  # TF32-free fp32 matmuls differ slightly by kernel
    a = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    b = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(a, b)
    assert model.offload.stats()["evictions"] > 0
    model.offload.close()


def test_slots_on_device_and_staging_pinned_and_reused(model_dir, prompt):
    model = offload_moe.load(model_dir("mixtral"), device="cuda", cache_experts=2, dtype="float32", progress=False)
    cache = model.offload.cache
    assert cache.pool.buffer.is_cuda
    mover = cache.mover
    assert isinstance(mover, CudaMover)
    model.generate(prompt.to("cuda"), max_new_tokens=8, do_sample=False)  # each reader thread makes its buffer
    buffers = [b.data_ptr() for b in mover._stagings]
    assert buffers and all(b.is_pinned() for b in mover._stagings)
    model.generate(prompt.to("cuda"), max_new_tokens=8, do_sample=False)
    assert [b.data_ptr() for b in mover._stagings] == buffers  # reused, never reallocated
    assert model.offload.stats()["misses"] > len(buffers)
    model.offload.close()


@pytest.mark.parametrize("io", ["direct", "buffered"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen3_moe"])
def test_staged_reads_are_byte_exact_on_the_gpu(family, dtype, io, model_dir):
    """disk -> pinned staging -> GPU slot (row blocks, transposed pieces, a dtype cast on the GPU) holds what the
    CPU mover reads; with O_DIRECT and tensor starts on their dtype's size, no scratch buffer is touched."""
    from offload_moe.cache import SlotPool

    model = offload_moe.load(model_dir(family), device="cuda", cache_experts=2, dtype=dtype, io=io, progress=False)
    cache = model.offload.cache
    store, mover, layout = cache.store, cache.mover, cache.pool.layout
    gpu = SlotPool(1, layout, torch.device("cuda"))
    keys = sorted(store.pieces)[:6]
    got = {}
    for key in keys:
        gpu.buffer.fill_(float("nan"))
        t = mover._read_staged(*key, gpu.views(0), torch.cuda.current_stream())
        t.done.synchronize()
        got[key] = {name: v.cpu() for name, v in gpu.views(0).items()}
    pieces = [p for key in keys for p in store.pieces[key]]
    if store.reader.io == "direct" and all(p.offset % p.dtype.itemsize == 0 for p in pieces):
        assert getattr(store.reader._local, "scratch", None) is None  # read in place into the pinned staging
    cpu = SlotPool(1, layout, torch.device("cpu"))
    reference = Mover(store, readers=1)
    for key in keys:
        reference._read(*key, cpu.views(0))
        for name, want in cpu.views(0).items():
            assert torch.equal(got[key][name], want), (key, name)
    model.offload.close()


def test_bf16_on_cuda(model_dir, prompt):
    model = offload_moe.load(model_dir("qwen3_moe"), device="cuda", cache_experts=3, dtype="bfloat16", progress=False)
    out = model.generate(prompt.to("cuda"), max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 8
    model.offload.close()


def test_pinned_host_tier_and_freed_on_delete(model_dir, prompt):
    import gc
    import weakref

    model = offload_moe.load(model_dir("mixtral"), device="cuda", cache_experts=2, dtype="float32",
                             host_memory=4 * 18432, progress=False)
    cache = model.offload.cache
    assert cache.host.pool.buffer.is_pinned() and cache.host.pool._pinned.registered  # to the page, no rounding
    model.generate(prompt.to("cuda"), max_new_tokens=8, do_sample=False)
    s = model.offload.stats()
    assert s["bytes_moved"]["host_to_device"] > 0 and s["bandwidth"]["host_to_device"] > 0
    refs = [weakref.ref(cache.host.pool.buffer), weakref.ref(cache.pool.buffer)]
    refs += [weakref.ref(b) for b in cache.mover._stagings]
    staging = cache.mover._stagings[0]
    assert staging.is_pinned()
    del model, cache, s
    gc.collect()
    assert not staging.is_pinned()  # the model's finalizer unlocked it
    del staging
    assert all(r() is None for r in refs)


def test_close_unlocks_the_host_tier_and_staging(model_dir, prompt):
    model = offload_moe.load(model_dir("mixtral"), device="cuda", cache_experts=2, dtype="float32",
                             host_memory=4 * 18432, progress=False)
    model.generate(prompt.to("cuda"), max_new_tokens=4, do_sample=False)
    host, staging = model.offload.cache.host.pool.buffer, model.offload.cache.mover._stagings[0]
    assert host.is_pinned() and staging.is_pinned()
    model.offload.close()
    assert not host.is_pinned() and not staging.is_pinned()


@pytest.mark.parametrize("settings", [dict(prefetch="gate"), dict(prefetch="transition", host_memory="1GiB"),
                                      dict(prefetch="gate", host_memory=3 * 18432, io="dontneed"),
                                      dict(prefetch="hybrid", prefetch_margin=2, readers=1),  # queued prefetches cancelled
                                      dict(prefetch="hybrid", host_memory=3 * 18432, readers=1)])
def test_prefetch_and_tiers_keep_parity_on_cuda(settings, model_dir, prompt):
    folder = model_dir("qwen3_moe")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to("cuda")
    ids = prompt.to("cuda")
    want = ref.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    model = offload_moe.load(folder, device="cuda", cache_experts=3, dtype="float32", progress=False, **settings)
    assert torch.equal(model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False), want)
    s = model.offload.stats()
    assert s["stall_seconds"] >= 0 and s["tokens"] > 0
    model.offload.close()


@pytest.mark.parametrize("where", ["_read_staged", "_copy"])
def test_device_oom_during_a_load_is_clear_and_recoverable(where, model_dir, prompt, monkeypatch):
    from offload_moe.errors import ExpertLoadError

    folder = model_dir("mixtral")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to("cuda")
    ids = prompt.to("cuda")
    with torch.no_grad():
        want = ref(ids).logits
    host = 3 * 18432 if where == "_copy" else None
    model = offload_moe.load(folder, device="cuda", cache_experts=3, dtype="float32", host_memory=host,
                             progress=False)
    real = getattr(CudaMover, where)
    armed = [True]

    def failing(self, *args, **kwargs):
        if armed[0]:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CudaMover, where, failing)
    with pytest.raises(ExpertLoadError, match=r"expert \d+ of layer \d+.*out of memory"):
        with torch.no_grad():
            model(ids)
    armed[0] = False
    cache = model.offload.cache
    cache.drain()
    cache.residency.check()
    with torch.no_grad():
        got = model(ids).logits
    assert ((want - got).abs().max() / want.abs().max()).item() <= 1e-4
    model.offload.close()


def test_slot_pool_too_large_for_the_device_is_a_budget_error():
    from offload_moe.cache import SlotLayout, SlotPool

    free, _ = torch.cuda.mem_get_info()
    layout = SlotLayout({"gate_up_proj": (1024, 1024)}, torch.float32)  # 4 MiB a slot
    with pytest.raises(offload_moe.BudgetError, match="expert slots"):
        SlotPool(2 * free // layout.nbytes, layout, torch.device("cuda"))


def test_mmap_is_refused_on_cuda_with_a_clear_error(model_dir):
    from offload_moe.errors import ConfigError

    with pytest.raises(ConfigError, match="io='mmap'.*device='cpu'"):
        offload_moe.load(model_dir("mixtral"), device="cuda", cache_experts=2, io="mmap", progress=False)
    model = torch.nn.Sequential(torch.nn.Module())
    model[0].gate = torch.nn.Linear(4, 3)
    model[0].experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    with pytest.raises(ConfigError, match="io='mmap'.*device='cpu'"):
        offload_moe.offload_experts(model, device="cuda", cache_experts=2, io="mmap")
    assert isinstance(model[0].experts, torch.nn.ModuleList)  # refused before the model changed
