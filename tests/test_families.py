"""Parity of every supported family against transformers' own model with every weight resident."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from tiny_models import FAMILIES, relative_error

RTOL = 1e-5
NEW_TOKENS = 32


def reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_at_minimum_and_full_budget(family, model_dir, prompt):
    folder = model_dir(family)
    ref = reference(folder)
    with torch.no_grad():
        want_logits = ref(prompt).logits
    want_tokens = ref.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    total = None
    for budget in ("min", "all"):
        model = offload_moe.load(folder, cache_experts=2 if budget == "min" else None, cache_memory=None if budget == "min" else "1GiB",
                                 dtype="float32", progress=False)
        total = model.offload.stats()["total_experts"]
        assert model.offload.stats()["capacity_experts"] == (2 if budget == "min" else total)
        with torch.no_grad():
            got_logits = model(prompt).logits
        assert relative_error(want_logits, got_logits) <= RTOL, (family, budget)
        got_tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(want_tokens, got_tokens), (family, budget)
        stats = model.offload.stats()
        if budget == "min":
            assert stats["misses"] > 0 and stats["evictions"] > 0  # the experts really streamed through two slots
        else:
            assert stats["misses"] == stats["evictions"] == 0 and stats["hits"] > 0  # all loaded when the model was
            assert stats["resident_experts"] == total
        model.offload.close()


def test_model_keeps_its_own_modules(model_dir):
    """Only the routed experts are replaced: router, shared expert and attention stay the model's own."""
    model = offload_moe.load(model_dir("qwen2_moe"), cache_experts=2, dtype="float32", progress=False)
    block = model.model.layers[0].mlp
    assert type(block).__name__ == "Qwen2MoeSparseMoeBlock"
    assert type(block.gate).__name__ == "Qwen2MoeTopKRouter"
    assert type(block.shared_expert).__name__ == "Qwen2MoeMLP"
    assert type(block.experts).__name__ == "OffloadedExperts"
    # no parameter of the model holds routed-expert weights
    assert not any("experts.gate_up_proj" in n or "experts.down_proj" in n for n, _ in model.named_parameters())


def test_bf16_checkpoint_loads_in_its_own_dtype(model_dir, prompt):
    folder = model_dir("gpt_oss")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    model = offload_moe.load(folder, cache_experts=2, progress=False)
    assert model.offload.dtype == torch.bfloat16
    with torch.no_grad():
        err = relative_error(ref(prompt).logits.float(), model(prompt).logits.float())
    assert err < 2e-2  # bf16 rounding differs between grouped and per-expert matmuls
