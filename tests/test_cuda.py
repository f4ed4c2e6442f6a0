"""CUDA paths: slots on the device, pinned staging buffers reused, parity on the GPU. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.transfer import CudaMover

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
    buffers = [b.data_ptr() for b in mover.buffers]
    assert all(b.is_pinned() for b in mover.buffers)
    model.generate(prompt.to("cuda"), max_new_tokens=8, do_sample=False)
    assert [b.data_ptr() for b in mover.buffers] == buffers  # reused, never reallocated
    assert model.offload.stats()["misses"] > len(buffers)
    model.offload.close()


def test_bf16_on_cuda(model_dir, prompt):
    model = offload_moe.load(model_dir("qwen3_moe"), device="cuda", cache_experts=3, dtype="bfloat16", progress=False)
    out = model.generate(prompt.to("cuda"), max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 8
    model.offload.close()
