"""OffloadConfig: every setting checked when built, with the error naming it; built from a hardware profile
plus overrides; frozen; the same model whether load and offload_experts get a config or keyword arguments."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import offload_moe
from offload_moe import OffloadConfig
from offload_moe.errors import BudgetError, ConfigError, DeviceError
from offload_moe.generic import offload_experts
from offload_moe.hardware import get_profile
from offload_moe.prefetch import Predictor
from offload_moe.values import IO_MODES, PREDICTORS

BAD = [  # (setting, value, error class, what the message starts with or says)
    ("device", "tpu", DeviceError, "device='tpu'"),
    ("device", "not a device!", DeviceError, "is not a device name"),
    ("dtype", "int8", ConfigError, "dtype='int8' is not supported"),
    ("policy", "mru", ConfigError, "unknown eviction policy 'mru'"),
    ("policy", "belady", ConfigError, "needs the future access sequence"),
    ("policy", 3, ConfigError, "policy=3 is not an eviction policy name"),
    ("host_policy", "mru", ConfigError, "unknown eviction policy 'mru'"),
    ("prefetch", "oracle", ConfigError, "prefetch='oracle' is not a predictor; use one of none, gate"),
    ("prefetch", 7, ConfigError, "prefetch=7 is not a predictor"),
    ("prefetch_margin", -1, ConfigError, "prefetch_margin=-1 must be 0 or more"),
    ("prefetch_margin", "2", ConfigError, "prefetch_margin='2' must be a whole number"),
    ("prefetch_depth", 0, ConfigError, "prefetch_depth=0 must be at least 1 layer"),
    ("prefetch_depth", True, ConfigError, "prefetch_depth=True must be a whole number"),
    ("readers", 0, ConfigError, "readers=0 must be at least 1"),
    ("readers", 1.5, ConfigError, "readers=1.5 must be a whole number"),
    ("io", "aio", ConfigError, "io='aio' is not an I/O mode"),
    ("read_timeout", math.inf, ConfigError, "read_timeout=inf must be a number of seconds"),
    ("read_timeout", 0, ConfigError, "read_timeout=0 must be a number of seconds"),
    ("cache_experts", 2.5, BudgetError, "cache_experts=2.5 must be a whole number of experts"),
    ("cache_memory", "lots", BudgetError, "cache_memory='lots' is not a size"),
    ("cache_memory", math.nan, BudgetError, "cache_memory=nan is not a number"),
    ("host_memory", "0", BudgetError, "host_memory='0' must be a positive size"),
    ("device_memory", math.inf, BudgetError, "device_memory=inf"),
    ("seed", "x", ConfigError, "seed='x' must be a whole number"),
    ("profile", "gpu-12gb", ConfigError, "OffloadConfig.from_profile"),
]


@pytest.mark.parametrize("setting,value,error,message", BAD, ids=[f"{s}={v!r}" for s, v, _, _ in BAD])
def test_a_bad_setting_is_refused_naming_it(setting, value, error, message):
    with pytest.raises(error, match="^" + message if message.startswith(setting) else message):
        OffloadConfig(**{setting: value})


def test_combinations_are_checked():
    with pytest.raises(BudgetError, match="give either cache_experts or cache_memory, not both"):
        OffloadConfig(cache_experts=4, cache_memory="1GiB")
    with pytest.raises(ConfigError, match="host_memory adds nothing with io='mmap'"):
        OffloadConfig(io="mmap", host_memory="1GiB")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_gpu_on_a_machine_without_one_is_refused():
    with pytest.raises(DeviceError, match="device='cuda' was asked for, but torch sees no CUDA GPU"):
        OffloadConfig(device="cuda")


@pytest.mark.cuda
def test_mmap_from_a_profile_on_a_gpu_says_where_it_came_from():
    with pytest.raises(ConfigError, match="needs device='cpu' .* comes from hardware profile 'cpu-16gb'"):
        OffloadConfig.from_profile("cpu-16gb", device="cuda")
    assert OffloadConfig.from_profile("cpu-16gb", device="cuda", io="direct").device.type == "cuda"


def test_values_are_normalised_and_none_means_the_default():
    c = OffloadConfig(device="cpu", dtype="bf16", policy="LRU", prefetch="Gate")
    assert c.device == torch.device("cpu") and c.dtype is torch.bfloat16
    assert c.policy == "lru" and c.prefetch == "gate"
    d = OffloadConfig(device=None, policy=None, host_policy=None, prefetch=None, prefetch_margin=None,
                      prefetch_depth=None, io=None)
    assert d == OffloadConfig()
    assert (d.device, d.policy, d.prefetch, d.prefetch_margin, d.prefetch_depth, d.io) == \
        (torch.device("cpu"), "lru", "none", 1, 1, "auto")
    assert OffloadConfig(read_timeout=None).read_timeout is None  # None here means: wait forever
    predictor = Predictor()
    assert OffloadConfig(prefetch=predictor).prefetch is predictor
    assert set(IO_MODES) == {"auto", "direct", "dontneed", "buffered", "mmap"} and "gate" in PREDICTORS


def test_frozen_equal_hashable_and_replace_checks_again():
    c = OffloadConfig(cache_experts=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.readers = 3
    assert c == OffloadConfig(cache_experts=4) and hash(c) == hash(OffloadConfig(cache_experts=4))
    assert c != OffloadConfig(cache_experts=5)
    r = dataclasses.replace(c, policy="fifo")
    assert (r.policy, r.cache_experts, c.policy) == ("fifo", 4, "lru")
    with pytest.raises(ConfigError, match="^readers=0"):
        dataclasses.replace(c, readers=0)


def test_from_profile_fills_in_and_explicit_overrides_win(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\nhost_memory = "2GiB"\n'
                 'policy = "fifo"\nprefetch = "transition"\nprefetch_margin = 2\n')
    c = OffloadConfig.from_profile(f)
    assert (c.policy, c.prefetch, c.prefetch_margin, c.device_memory, c.host_memory) == \
        ("fifo", "transition", 2, "1GiB", "2GiB")
    assert c.profile.name == "box" and c.prefetch_from_profile()
    o = OffloadConfig.from_profile(f, policy="lru", prefetch="none", cache_experts=4)
    assert (o.policy, o.prefetch, o.cache_experts, o.host_memory) == ("lru", "none", 4, "2GiB")
    assert not o.prefetch_from_profile()
    kept = OffloadConfig.from_profile(f, policy=None, host_memory=None, read_timeout=None)
    assert (kept.policy, kept.host_memory) == ("fifo", "2GiB")  # None: not given, the profile's stays
    assert kept.read_timeout is None  # a setting the profile does not give keeps the None it was given
    assert OffloadConfig.from_profile(get_profile(f)) == c  # a Profile object works as well as its path
    assert c == OffloadConfig(policy="fifo", prefetch="transition", prefetch_margin=2, device_memory="1GiB",
                              host_memory="2GiB")  # where the settings came from is not part of equality


def test_from_profile_checks_names_and_the_profile():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'cache_size' \(did you mean cache_memory\?\); the settings "
                                          "are device, dtype"):
        OffloadConfig.from_profile("cpu-16gb", cache_size=4)
    with pytest.raises(ConfigError, match="no hardware profile named 'no-such'"):
        OffloadConfig.from_profile("no-such")
    with pytest.raises(ConfigError, match="host_memory adds nothing with io='mmap'"):
        OffloadConfig.from_profile("cpu-16gb", io="mmap", host_memory="1GiB")
    assert OffloadConfig.from_profile("cpu-16gb", host_memory="1GiB").io == "auto"  # auto reads into slots then


def test_load_refuses_an_unknown_option_naming_it_before_reading_anything(tmp_path):
    with pytest.raises(ConfigError, match=r"^load\(\) got unknown option\(s\) 'cache_size' .*; the settings are .*readers"):
        offload_moe.load(tmp_path / "no-such-model", cache_size=4)
    with pytest.raises(ConfigError, match=r"'progres' \(did you mean progress\?\).*load also takes progress, trust_remote"):
        offload_moe.load(tmp_path / "no-such-model", progres=False)
    with pytest.raises(ConfigError, match="config takes an offload_moe.OffloadConfig"):
        offload_moe.load(tmp_path / "no-such-model", {"cache_experts": 4})
    with pytest.raises(ConfigError, match="both config= and profile="):
        offload_moe.load(tmp_path / "no-such-model", OffloadConfig(), profile="cpu-16gb")


def test_load_with_a_config_equals_load_with_its_fields(model_dir, prompt):
    fields = dict(cache_experts=3, policy="fifo", prefetch="transition", prefetch_margin=2, readers=1, io="buffered",
                  dtype="float32", read_timeout=30.0, seed=3)
    a = offload_moe.load(model_dir("mixtral"), OffloadConfig(**fields), progress=False)
    b = offload_moe.load(model_dir("mixtral"), progress=False, **fields)
    c = offload_moe.load(model_dir("mixtral"), config=OffloadConfig(cache_experts=5, policy="fifo"),
                         progress=False, **{k: v for k, v in fields.items() if k != "policy"})
    try:
        with torch.no_grad():
            outputs = [m(prompt).logits for m in (a, b, c)]
        assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
        stats = [m.offload.stats() for m in (a, b, c)]
        for key in ("capacity_experts", "hits", "misses", "prefetch", "bytes_loaded"):
            assert stats[0][key] == stats[1][key] == stats[2][key], key  # overrides won: cache_experts=3
        assert a.offload.cache.residency.policy.name == c.offload.cache.residency.policy.name == "fifo"
        assert a.offload.cache.read_timeout == 30.0
    finally:
        for m in (a, b, c):
            m.offload.close()


def test_load_with_a_profile_config_equals_load_with_the_profile(model_dir, tmp_path):
    f = tmp_path / "box.toml"
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\npolicy = "fifo"\ndtype = "float32"\n')
    a = offload_moe.load(model_dir("mixtral"), OffloadConfig.from_profile(f), progress=False)
    b = offload_moe.load(model_dir("mixtral"), profile=f, progress=False)
    try:
        assert a.offload.stats()["capacity_experts"] == b.offload.stats()["capacity_experts"] == 12  # planned
        assert a.offload.cache.residency.policy.name == "fifo"
    finally:
        a.offload.close()
        b.offload.close()


HIDDEN = 8


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(4))

    def forward(self, x):
        weights, index = self.gate(x).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = (index == e).any(-1)
            if chosen.any():
                out[chosen] += expert(x[chosen]) * (weights * (index == e)).sum(-1)[chosen, None]
        return out


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Layer(), Layer()).eval()


def test_offload_experts_with_a_config_equals_offload_experts_with_its_fields():
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    fields = dict(cache_experts=3, policy="lfu", readers=1, io="buffered", read_timeout=30.0)
    outputs, stats = [], []
    for options in ({"config": OffloadConfig(**fields)}, fields, {"config": OffloadConfig(cache_experts=7), **fields}):
        model = two_layers()
        handle = offload_experts(model, **options)
        with torch.no_grad():
            outputs.append(model(x))
        stats.append(handle.stats())
        assert handle.cache.read_timeout == 30.0
        handle.close()
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert stats[0]["capacity_experts"] == stats[1]["capacity_experts"] == stats[2]["capacity_experts"] == 3
    assert stats[0]["misses"] == stats[1]["misses"] == stats[2]["misses"]


def test_offload_experts_refuses_an_unknown_option_before_the_model_changes():
    model = two_layers()
    with pytest.raises(ConfigError, match=r"^offload_experts\(\) got unknown option\(s\) 'cache_size'"):
        offload_experts(model, cache_size=4)
    with pytest.raises(ConfigError, match=r"'expert_attr' \(did you mean experts_attr\?\).*also takes layers, router"):
        offload_experts(model, expert_attr="experts")
    assert all(isinstance(layer.experts, nn.ModuleList) for layer in model)  # untouched


def test_offload_experts_has_the_host_tier_of_load():
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = two_layers()(x)
    model = two_layers()
    handle = offload_experts(model, cache_experts=2, host_memory="1MiB")  # holds all 8 experts: filled now
    s = handle.stats()
    assert s["host"]["resident_experts"] == s["host"]["capacity_experts"] == s["total_experts"] == 8
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-6)
    s = handle.stats()
    assert s["misses"] > 0 and s["bytes_moved"]["disk"] == 0  # every miss copied from the host tier
    assert s["host"]["hits"] == s["misses"] and s["host"]["misses"] == 0
    handle.close()


@pytest.mark.parametrize("verb", ["load", "offload_experts"])
def test_a_host_tier_without_room_for_one_expert_is_the_same_error_on_both_verbs(verb, model_dir):
    with pytest.raises(BudgetError, match=r"host_memory=100 holds no expert of \d+ bytes"):
        if verb == "load":
            offload_moe.load(model_dir("mixtral"), cache_experts=2, host_memory=100, progress=False)
        else:
            offload_experts(two_layers(), cache_experts=2, host_memory=100)


def test_offload_experts_with_a_profile_plans_its_slots_from_device_memory(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\npolicy = "fifo"\n')
    for options in ({"profile": f}, {"config": OffloadConfig.from_profile(f)}):
        model = two_layers()
        handle = offload_experts(model, **options)
        s = handle.stats()
        assert s["capacity_experts"] == s["resident_experts"] == 8 and s["policy"] == "fifo"  # all fit: filled
        handle.close()
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "256MiB"\n')  # all of it the workspace
    with pytest.raises(BudgetError, match="device_memory='256MiB' leaves room for 0 expert slot"):
        offload_experts(two_layers(), profile=f)


def test_one_function_cuts_every_value_shown_in_a_message():
    from offload_moe.safetensors_io import short_repr
    from offload_moe.values import shown

    huge = [2**20000, "x" * 10**6]  # a value a file or a caller may hold: Python cannot print the number
    assert shown(huge) == "[a number of 6021 digits, 'xxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxx' (1000000 characters)]"
    assert short_repr(huge).startswith("[a number of 6021 digits, 'xxx") and len(short_repr(huge)) < 260
    assert short_repr("model.layers.0.mlp.experts.gate_up_proj") == "'model.layers.0.mlp.experts.gate_up_proj'"
    deep = []
    for _ in range(10_000):
        deep = [deep]
    assert shown(deep) == "[[[[[[[...]]]]]]]"  # nested thousands deep: no RecursionError
