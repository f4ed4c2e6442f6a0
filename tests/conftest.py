"""Shared fixtures: tiny generated checkpoints, one per family, written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, make_model  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: intra-op threads gain nothing and spin on a busy CPU. Use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def gemv_without_timing(tmp_path_factory):
    """bf16 experts on the CPU at 1-4 tokens take offload_moe's GEMV wherever it fits (numba installed), so the
    parity tests check its numbers, whatever a calibration would time on this machine; nothing is written
    under the user's cache folder. tests/test_gemv.py tests the calibrated choice with a stubbed timer."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OFFLOAD_MOE_GEMV", "on")
        patch.setenv("OFFLOAD_MOE_CACHE_DIR", str(tmp_path_factory.mktemp("offload-moe-cache")))
        yield


@pytest.fixture(autouse=True)
def auto_io_reads_into_slots(request, monkeypatch):
    """The suite's tests were written when io="direct" was the default, and count slot loads: here io="auto" (the
    default) resolves to direct where it would map the experts, unless a test is marked ``io_auto``
    (tests/test_memory.py tests the rule itself; tests/test_mmap.py the mapped path; the doc examples run it)."""
    if request.node.get_closest_marker("io_auto"):
        return
    from offload_moe import attach, memory, planning

    real = memory.choose_io

    def to_slots(io, **kwargs):
        choice = real(io, **kwargs)
        if io == "auto" and choice.io == "mmap":
            return memory.IoChoice("direct", "auto: direct in the test suite (tests/conftest.py)")
        return choice

    monkeypatch.setattr(attach, "choose_io", to_slots)
    monkeypatch.setattr(planning, "choose_io", to_slots)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """``model_dir(family)`` -> folder of a tiny seeded ``family`` checkpoint (made once per session)."""
    made: dict[str, Path] = {}

    def get(family: str = "mixtral") -> Path:
        if family not in made:
            made[family] = make_model(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


VERBS = ["load", "offload_experts"]


@pytest.fixture
def offloaded(model_dir):
    """``offloaded(verb, family="mixtral", **settings)`` -> the tiny ``family`` model with offloaded experts, built
    by ``offload_moe.load`` on its checkpoint or by ``offload_experts`` on transformers' own model of it (float32)."""
    import offload_moe
    from transformers import AutoModelForCausalLM

    def make(verb: str, family: str = "mixtral", **settings):
        if verb == "load":
            return offload_moe.load(model_dir(family), dtype="float32", progress=False, **settings)
        model = AutoModelForCausalLM.from_pretrained(model_dir(family), dtype=torch.float32).eval()
        offload_moe.offload_experts(model, **settings)
        return model

    return make


@pytest.fixture
def prompt():
    return torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))


def all_families():
    return list(FAMILIES)
