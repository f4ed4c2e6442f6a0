"""plan(): what fits where, from config and headers only."""

from __future__ import annotations

import pytest
import torch

import offload_moe
from offload_moe.cache import SlotLayout
from offload_moe.planning import WORKSPACE_MIN, kv_bytes_per_token


def test_plan_arithmetic(model_dir):
    folder = model_dir("mixtral")
    model = offload_moe.load(folder, cache_experts=2, dtype="float32", progress=False)
    expert_bytes = model.offload.stats()["expert_bytes"]
    dense = sum(p.numel() * 4 for p in model.parameters())
    model.offload.close()
    budget = WORKSPACE_MIN + dense + 200 * 4 * 2 * 3 * 2 * 8 + 5 * expert_bytes + 7
    p = offload_moe.plan(folder, device_memory=budget, dtype="float32", context_length=200)  # the model reads 256
    assert p.dense_bytes == dense
    assert p.expert_bytes == expert_bytes
    assert p.kv_bytes_per_token == 3 * 2 * 2 * 8 * 4  # layers x (k, v) x kv heads x head dim x fp32
    assert p.expert_slots == 5 and p.fits
    assert p.total_experts == 12 and p.moe_layers == 3 and p.top_k == 2
    assert "expert slots: 5 of 12" in str(p)


def test_plan_that_does_not_fit(model_dir):
    p = offload_moe.plan(model_dir("mixtral"), device_memory="1MiB")
    assert not p.fits and p.expert_slots == 0
    assert "does not fit" in str(p)


def test_plan_uses_checkpoint_dtype_by_default(model_dir):
    p = offload_moe.plan(model_dir("gpt_oss"), device_memory="1GiB")
    assert p.dtype == "bfloat16"
    assert p.expert_bytes == SlotLayout({"gate_up_proj": (32, 96), "gate_up_proj_bias": (96,), "down_proj": (48, 32),
                                         "down_proj_bias": (32,)}, torch.bfloat16).nbytes


def test_mla_kv_estimate(model_dir):
    from offload_moe.loader import load_config

    cfg = load_config(model_dir("deepseek_v3"))
    assert kv_bytes_per_token(cfg, 2) == 3 * 4 * (8 + 8 + 8) * 2


def test_plan_bad_budget(model_dir):
    with pytest.raises(offload_moe.BudgetError, match="device_memory"):
        offload_moe.plan(model_dir("mixtral"), device_memory="twelve")


def test_plan_with_mmap_says_a_partial_slot_pool_stays_empty():
    from offload_moe import demo_model_path, plan

    partial = plan(demo_model_path(), device_memory="280MiB", io="mmap")
    assert partial.as_dict()["io"] == "mmap" and 0 < partial.expert_slots < partial.total_experts
    part, where, _ = partial.rows()[-1]
    assert "mapped checkpoint" in part and "slots stay empty" in part and where == "page cache, else disk"
    whole = plan(demo_model_path(), device_memory="1GiB", io="mmap")  # every expert fits: filled at load
    assert whole.rows()[-1][0] == "experts read from disk on a miss: 0"
    profiled = plan(demo_model_path(), profile="cpu-16gb")  # io="auto": its 9 GiB hold every expert of the demo
    assert profiled.io == "direct" and "the slots hold every expert" in profiled.io_reason


def test_plan_refuses_an_unknown_io_mode_and_a_negative_context(model_dir):
    with pytest.raises(offload_moe.ConfigError, match="io='fast'"):
        offload_moe.plan(model_dir("mixtral"), device_memory="1GiB", io="fast")
    with pytest.raises(offload_moe.BudgetError, match="context_length=-5"):
        offload_moe.plan(model_dir("mixtral"), device_memory="1GiB", context_length=-5)
    assert offload_moe.plan(model_dir("mixtral"), device_memory="1GiB", context_length=0).kv_reserve_bytes == 0
    with pytest.raises(offload_moe.ConfigError, match="host_memory adds nothing with io='mmap'"):
        offload_moe.plan(model_dir("mixtral"), device_memory="1GiB", host_memory="1GiB", io="mmap")  # as load refuses


def test_plan_checks_its_options_once(model_dir, monkeypatch):
    from offload_moe import planning

    calls = []
    real = planning._check_options
    monkeypatch.setattr(planning, "_check_options", lambda *a: calls.append(a) or real(*a))
    offload_moe.plan(model_dir("mixtral"), device_memory="1GiB", host_memory="1MiB")
    assert len(calls) == 1


@pytest.mark.parametrize("verb", ["load", "offload_experts"])
def test_both_verbs_size_slots_from_device_memory_by_the_rule_plan_gives(model_dir, verb):
    """The same device budget gives the same slots: dense weights, a KV cache of the model's context and the
    workspace come off first, for a model built in memory as for a checkpoint."""
    from transformers import AutoModelForCausalLM

    folder = model_dir("mixtral")
    p = offload_moe.plan(folder, device_memory="1GiB", dtype="float32")
    assert p.kv_reserve_bytes > 2 * p.expert_bytes  # without the KV reserve, more slots would fit
    budget = WORKSPACE_MIN + p.dense_bytes + p.kv_reserve_bytes + int(3.5 * p.expert_bytes)
    assert offload_moe.plan(folder, device_memory=budget, dtype="float32").expert_slots == 3
    if verb == "load":
        model = offload_moe.load(folder, device_memory=budget, dtype="float32", progress=False)
        handle = model.offload
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        handle = offload_moe.offload_experts(model, device_memory=budget)
    try:
        assert handle.stats()["capacity_experts"] == 3
    finally:
        handle.close()


@pytest.mark.parametrize("verb", ["load", "offload_experts"])
def test_a_device_memory_too_small_for_two_slots_is_refused_naming_device_memory(model_dir, verb):
    """Not as "cache_experts=1 gives 1 expert slot(s)": a setting the caller never gave."""
    from transformers import AutoModelForCausalLM

    folder = model_dir("mixtral")
    p = offload_moe.plan(folder, device_memory="1GiB", dtype="float32")
    budget = WORKSPACE_MIN + p.dense_bytes + p.kv_reserve_bytes + int(1.5 * p.expert_bytes)  # one slot
    with pytest.raises(offload_moe.BudgetError, match=rf"^device_memory={budget} leaves room for 1 expert slot\(s\) "
                       r"of .* after the dense weights .*, a KV cache .* and a workspace .*; offload_moe needs at least 2"):
        if verb == "load":
            offload_moe.load(folder, device_memory=budget, dtype="float32", progress=False)
        else:
            offload_moe.offload_experts(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                        device_memory=budget)
