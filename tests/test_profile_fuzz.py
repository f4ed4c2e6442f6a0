"""Fuzzing hardware profiles: whatever the TOML file holds (wrong types, huge numbers, odd unicode, nesting,
bytes that are not TOML), ``read_profile`` returns a checked Profile or raises ConfigError, quickly."""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload_moe.config import parse_bytes, parse_dtype
from offload_moe.errors import ConfigError
from offload_moe.hardware import FIELDS, INT_FIELDS, Profile, read_profile

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SECONDS = 2.0  # one profile, however odd, is judged well within this


class Raw(str):
    """A TOML token written as it is (an integer too long for Python to print, a bare inf)."""


HUGE = st.sampled_from([Raw("9" * 5000), Raw("-" + "9" * 400), Raw("1e400"), Raw("inf"), Raw("nan"), Raw("0x" + "f" * 300)])
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
SIZES = st.one_of(st.sampled_from(["1GiB", "0", "-1GiB", "inf", "nan", "1e3", "9" * 400 + "GiB", "12XB", " 6 gib ",
                                   "1.5g", "0.0000001KiB", "\u0661\u0662GiB"]), TEXT)
SCALARS = st.one_of(st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), TEXT, SIZES)
VALUES = st.recursive(st.one_of(*[SCALARS] * 6, HUGE), lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
CHOICES = {
    "device": st.one_of(st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:99999", "CPU", "tpu", ""]), TEXT),
    "dtype": st.sampled_from(["float32", "bf16", "banana", "int8", "torch.float16"]),
    "policy": st.sampled_from(["lru", "LFU", "belady", "mru", "random"]),
    "prefetch": st.sampled_from(["none", "gate", "Hybrid", "oracle"]),
    "io": st.sampled_from(["direct", "mmap", "buffered", "dontneed", "DIRECT"]),
    "device_memory": SIZES,
    "host_memory": SIZES,
    "prefetch_margin": st.one_of(st.integers(-5, 5000), HUGE),
    "prefetch_depth": st.one_of(st.integers(-5, 2000), HUGE),
}
REQUIRED = ("description", "device", "device_memory")


def plausible(key: str):
    """Mostly a plausible value for ``key``, sometimes any value at all."""
    return st.one_of(*[CHOICES.get(key, TEXT)] * 4, VALUES)


# a near-valid profile: the required fields (each mostly plausible), some optional ones, sometimes a stray key
DOCUMENTS = st.builds(
    lambda known, stray: {**known, **stray},
    st.fixed_dictionaries({k: plausible(k) for k in REQUIRED},
                          optional={k: plausible(k) for k in FIELDS if k not in REQUIRED}),
    st.one_of(st.just({}), st.just({}), st.dictionaries(st.one_of(TEXT, st.sampled_from(FIELDS)), VALUES, max_size=2)),
)


def toml(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml(k)} = {toml(v)}" for k, v in value.items()) + "}"


def document(data: dict) -> str:
    return "".join(f"{toml(key)} = {toml(value)}\n" for key, value in data.items())


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "box.toml"


def judged(path) -> Profile | None:
    """read_profile's verdict: a Profile, or None for a ConfigError naming the file; anything else fails the test."""
    start = time.perf_counter()
    try:
        profile = read_profile(path)
    except ConfigError as e:
        assert "box.toml" in str(e) and len(str(e)) < 1000
        profile = None
    assert time.perf_counter() - start < SECONDS
    return profile


def check_profile(profile: Profile) -> None:
    """What a returned profile promises to load()."""
    assert all(isinstance(getattr(profile, k), str) for k in ("description", "device", "device_memory"))
    parse_bytes(profile.device_memory, "device_memory")
    if profile.host_memory is not None:
        parse_bytes(profile.host_memory, "host_memory")
    parse_dtype(profile.dtype)
    for key, (low, high) in INT_FIELDS.items():
        value = getattr(profile, key)
        assert value is None or (type(value) is int and low <= value <= high)


@FUZZ
@given(DOCUMENTS)
def test_any_toml_document_is_a_profile_or_a_config_error(path, data):
    path.write_text(document(data), encoding="utf-8")
    profile = judged(path)
    if profile is not None:
        check_profile(profile)


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_are_a_profile_or_a_config_error(path, data):
    path.write_bytes(data)
    assert judged(path) is None  # no byte string of this size holds the three required settings by chance


@FUZZ
@given(st.sampled_from(sorted(CHOICES)), VALUES)
def test_one_bad_field_in_a_valid_profile_is_named(path, key, value):
    data = {"description": "box", "device": "cpu", "device_memory": "1GiB", key: value}
    path.write_text(document(data), encoding="utf-8")
    profile = judged(path)
    if profile is not None:
        check_profile(profile)


def test_the_fuzzer_reaches_valid_profiles(path):
    """The near-valid documents do include accepted ones, so the fuzz is not all rejections."""
    path.write_text(document({"description": "box", "device": "cuda:0", "device_memory": "12GiB", "host_memory": "1.5g",
                              "prefetch_margin": 4096, "prefetch_depth": 1, "policy": "LFU"}))
    check_profile(read_profile(path))
