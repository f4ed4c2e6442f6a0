"""Hardware profiles: bundled TOML files, lookup by name or path, explicit settings win."""

from __future__ import annotations

import os
import re

import pytest
import torch

import offload_moe
from offload_moe.errors import ConfigError
from offload_moe.hardware import get_profile, list_profiles
from offload_moe.values import check_io

PROFILE = 'description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\n'


def test_bundled_profiles_are_valid():
    names = [p.name for p in list_profiles()]
    assert {"gpu-12gb", "gpu-24gb", "cpu-32gb"} <= set(names)
    for p in list_profiles():
        assert p.description and p.device in ("cpu", "cuda")
        offload_moe.config.parse_bytes(p.device_memory)


def test_profile_by_path_and_errors(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('description = "test box"\ndevice = "cpu"\ndevice_memory = "1GiB"\npolicy = "fifo"\n')
    assert get_profile(f).policy == "fifo"
    with pytest.raises(ConfigError, match="gpu-24gb"):
        get_profile("no-such-profile")
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="colour"):
        get_profile(f)
    f.write_text("not = [toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        get_profile(f)


def test_profile_fills_in_and_explicit_settings_win(model_dir, tmp_path):
    f = tmp_path / "box.toml"
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\npolicy = "fifo"\ndtype = "float32"\n')
    model = offload_moe.load(model_dir("mixtral"), profile=f, progress=False)
    assert model.offload.cache.residency.policy.name == "fifo"
    assert model.offload.stats()["capacity_experts"] == 12  # 1 GiB holds every expert of the tiny model
    model.offload.close()
    model = offload_moe.load(model_dir("mixtral"), profile=f, policy="lru", cache_experts=3, progress=False)
    assert model.offload.cache.residency.policy.name == "lru"
    assert model.offload.stats()["capacity_experts"] == 3
    model.offload.close()


def test_profiles_cover_the_common_machines():
    names = {p.name for p in list_profiles()}
    assert {"gpu-8gb", "gpu-12gb", "gpu-16gb", "gpu-24gb", "gpu-80gb", "cpu-16gb", "cpu-32gb"} <= names
    for p in list_profiles():
        assert p.policy and p.prefetch in ("none", "gate", "transition"), p.name
        if p.host_memory is not None:
            offload_moe.config.parse_bytes(p.host_memory)


def test_profile_prefetch_and_host_settings_apply_and_yield_to_explicit_ones(model_dir, tmp_path):
    f = tmp_path / "box.toml"
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\nhost_memory = "1GiB"\n'
                 'prefetch = "transition"\nprefetch_margin = 2\nprefetch_depth = 2\n')
    model = offload_moe.load(model_dir("mixtral"), profile=f, cache_experts=4, progress=False)
    s = model.offload.stats()
    assert s["prefetch"] == "transition"
    assert model.offload.prefetcher.predictor.width == 2 + 2 and model.offload.prefetcher.predictor.depth == 2
    assert model.offload.cache.host is not None
    model.offload.close()
    model = offload_moe.load(model_dir("mixtral"), profile=f, cache_experts=4, prefetch="none", progress=False)
    assert model.offload.stats()["prefetch"] == "none"
    model.offload.close()


def test_profile_with_a_wrongly_typed_setting_names_it(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\nprefetch_margin = "two"\n')
    with pytest.raises(ConfigError, match="prefetch_margin"):
        get_profile(f)


def test_profile_with_an_unknown_predictor_names_the_file(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\nprefetch = "oracle"\n')
    with pytest.raises(ConfigError, match=r"box.toml: prefetch = 'oracle'"):
        get_profile(f)
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\nprefetch_depth = 0\n')
    with pytest.raises(ConfigError, match="prefetch_depth"):
        get_profile(f)


@pytest.mark.parametrize("body, message", [
    ('policy = "mru"\n', r"box.toml: policy = 'mru'"),
    ('policy = "belady"\n', r"box.toml: policy = 'belady'"),
    ('dtype = "int8"\n', r"box.toml: dtype='int8'"),
    ('host_memory = "12XB"\n', r"box.toml: host_memory='12XB'"),
])
def test_profile_with_a_bad_policy_dtype_or_size_names_the_file(tmp_path, body, message):
    f = tmp_path / "box.toml"
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\n' + body)
    with pytest.raises(ConfigError, match=message):
        get_profile(f)
    f.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "0"\n')
    with pytest.raises(ConfigError, match=r"box.toml: device_memory='0'"):
        get_profile(f)


def test_a_profile_that_is_not_a_text_file_is_a_config_error(tmp_path):
    binary = tmp_path / "box.toml"
    binary.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ConfigError, match="box.toml is not UTF-8"):
        get_profile(binary)
    with pytest.raises(ConfigError, match="is a folder"):
        get_profile(tmp_path)


def test_a_device_or_a_fifo_is_refused_at_once(tmp_path):
    """`--profile /dev/zero` read without end, and a FIFO hung in open(); both are refused before reading."""
    fifo = tmp_path / "box.toml"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        with pytest.raises(ConfigError, match="not a regular file"):
            get_profile(path)


def test_a_profile_larger_than_a_profile_is_refused(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text(PROFILE + "# " + "x" * 2**20 + "\n")
    with pytest.raises(ConfigError, match="box.toml is larger than"):
        get_profile(f)


@pytest.mark.parametrize("line, message", [
    ('device_memory = "' + "9" * 5000 + '"', "device_memory='99999.*beyond any machine"),
    ("device_memory = " + "9" * 5000, "cannot be parsed"),
    ('device_memory = "inf"', "device_memory='inf' is not a size"),
    ("device_memory = inf", "device_memory = inf should be a string"),
    ('device_memory = "1e400"', "device_memory='1e400' is not a size"),
    ('host_memory = "' + "9" * 400 + 'GiB"', "host_memory='99999.*beyond any machine"),
    ("prefetch_margin = " + "9" * 30, "prefetch_margin = 9999.* must be 0..4096"),
    ("prefetch_depth = 0", "prefetch_depth = 0 must be 1..1024"),
    ('device = "tpu"', "device = 'tpu' is not a device"),
    ("device_memory = " + "[" * 5000 + "]" * 5000, "cannot be parsed"),
])
def test_a_profile_value_out_of_range_names_the_file_and_the_field(tmp_path, line, message):
    f = tmp_path / "box.toml"
    lines = [x for x in PROFILE.splitlines() if x.split(" = ")[0] != line.split(" = ")[0]]
    f.write_text("\n".join([*lines, line]) + "\n")
    with pytest.raises(ConfigError, match="box.toml") as info:
        get_profile(f)
    assert re.search(message, str(info.value)), str(info.value)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("settings, check", [
    ('device = "cpu"\ndevice_memory = "1GiB"\nio = "aio"\n', dict(io="aio")),
    ('device = "cuda"\ndevice_memory = "1GiB"\nio = "mmap"\n', dict(io="mmap", device=torch.device("cuda"))),
    ('device = "cpu"\ndevice_memory = "1GiB"\nhost_memory = "1GiB"\nio = "mmap"\n', dict(io="mmap", host_memory=True)),
])
def test_a_profile_checks_io_with_the_rule_offload_config_uses(tmp_path, settings, check):
    f = tmp_path / "box.toml"
    f.write_text('description = "x"\n' + settings)
    with pytest.raises(ConfigError) as rule:
        check_io(**check)
    with pytest.raises(ConfigError) as profile:
        get_profile(f)
    assert str(profile.value) == f"profile {f}: {rule.value}"  # one rule, one message, the file named first
