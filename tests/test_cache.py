"""The slot pool and the cache's use of it (policy behaviour is in test_policies.py)."""

from __future__ import annotations

import pytest
import torch

from offload_moe.cache import Residency, SlotLayout, SlotPool
from offload_moe.config import Budget, parse_bytes
from offload_moe.errors import BudgetError
from offload_moe.policies import make_policy

LAYOUT = SlotLayout({"gate_up_proj": (6, 4), "down_proj": (4, 3)}, torch.float32)


def test_slots_are_views_of_one_buffer_that_never_overlap():
    pool = SlotPool(5, LAYOUT, torch.device("cpu"))
    base = pool.buffer.data_ptr()
    spans = []
    for slot in range(5):
        for name, view in pool.views(slot).items():
            assert view.shape == LAYOUT.shapes[name]
            assert view.untyped_storage().data_ptr() == pool.buffer.untyped_storage().data_ptr()
            start = view.data_ptr() - base
            spans.append((start, start + view.numel() * 4))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_writing_one_slot_leaves_the_others():
    pool = SlotPool(3, LAYOUT, torch.device("cpu"))
    pool.buffer.zero_()
    pool.views(1)["gate_up_proj"].fill_(1.0)
    pool.views(1)["down_proj"].fill_(2.0)
    assert pool.buffer.view(torch.float32).sum().item() == 24 * 1.0 + 12 * 2.0  # the buffer is bytes
    assert pool.views(0)["gate_up_proj"].abs().sum() == 0 and pool.views(2)["down_proj"].abs().sum() == 0


def test_layout_bytes():
    assert LAYOUT.nbytes == (24 + 12) * 4
    assert SlotLayout(LAYOUT.shapes, torch.bfloat16).nbytes == (24 + 12) * 2


def test_budget_in_experts_or_bytes():
    assert Budget(cache_experts=5).slots(100, 64, 0) == 5
    assert Budget(cache_experts=500).slots(100, 64, 0) == 64  # never more slots than experts
    assert Budget(cache_memory="1KiB").slots(100, 64, 0) == 10
    assert Budget(cache_memory=250).slots(100, 64, 0) == 2
    assert Budget().slots(100, 64, 1000) == 10  # default: what the loader found free
    with pytest.raises(BudgetError, match="at least 2"):
        Budget(cache_experts=1).slots(100, 64, 0)
    with pytest.raises(BudgetError, match="whole number"):
        Budget(cache_experts=2.5).slots(100, 64, 0)


@pytest.mark.parametrize("text,value", [("6GiB", 6 * 2**30), ("512MB", 512 * 10**6), ("1.5g", 1_500_000_000),
                                        ("2 KiB", 2048), (4096, 4096)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_fully_pinned_cache_says_what_to_do():
    table = Residency(2, make_policy("lru"))
    table.request([(0, 0)])
    table.admit((0, 0))
    table.request([(0, 1)])
    table.admit((0, 1))
    with pytest.raises(BudgetError, match="raise cache_experts"):
        table.admit((0, 2))


def test_discard_frees_the_slot():
    table = Residency(2, make_policy("lru"))
    table.request([(0, 0)])
    slot, _ = table.admit((0, 0))
    table.discard((0, 0))
    assert (0, 0) not in table and slot in table.free
    table.check()
