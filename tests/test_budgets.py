"""Budgets and timeouts as numbers a user types: infinite, not-a-number, negative, absurdly long or larger
than the machine are refused with an error naming the option, before anything is read."""

from __future__ import annotations

import math

import psutil
import pytest
import torch

import offload_moe
from offload_moe.config import MAX_BYTES, Budget, check_read_timeout, parse_bytes
from offload_moe.errors import BudgetError, ConfigError

ABSURD = [math.inf, -math.inf, math.nan, -1, -0.5, 0, "0", "-1GiB", "inf", "nan", "1e400", "9" * 400, "9" * 400 + "GiB",
          10**400, "9" * 5000, 2**60 + 1, float(2**61), "2048PiB", None, [1], b"1GiB"]


@pytest.mark.parametrize("value", ABSURD, ids=[repr(v)[:16] for v in ABSURD])
def test_parse_bytes_refuses_what_is_not_a_size_a_machine_has(value):
    with pytest.raises(BudgetError, match="^cache_memory=") as info:
        parse_bytes(value, "cache_memory")
    assert len(str(info.value)) < 200


def test_parse_bytes_takes_sizes_up_to_the_limit():
    assert parse_bytes(MAX_BYTES) == MAX_BYTES
    assert parse_bytes("1024TiB") == 2**50
    assert parse_bytes(0.5e9) == 500_000_000


@pytest.mark.parametrize("setting", ["cache_memory", "host_memory"])
@pytest.mark.parametrize("value", [math.inf, math.nan, "9" * 400])
def test_load_refuses_a_bad_budget_before_reading_anything(tmp_path, setting, value):
    with pytest.raises(BudgetError, match=f"^{setting}="):
        offload_moe.load(tmp_path / "no-such-model", **{setting: value})


def test_plan_refuses_a_bad_device_memory(model_dir):
    with pytest.raises(BudgetError, match="^device_memory=inf"):
        offload_moe.plan(model_dir("mixtral"), device_memory=math.inf)


@pytest.mark.parametrize("setting", ["cache_memory", "host_memory"])
def test_a_budget_larger_than_the_machine_is_refused(model_dir, setting):
    ram = psutil.virtual_memory().total
    options = {"cache_experts": 2} if setting == "host_memory" else {}
    with pytest.raises(BudgetError, match=f"{setting}=.*more than the .* this machine's RAM has in all"):
        offload_moe.load(model_dir("mixtral"), **{setting: 2 * ram}, **options, progress=False)


def test_an_expert_count_larger_than_the_machine_is_refused():
    assert Budget(cache_experts=3).slots(2**20, 64, 0, torch.device("cpu")) == 3
    with pytest.raises(BudgetError, match="cache_experts=10 asks for 10.00 TiB, more than"):
        Budget(cache_experts=10).slots(2**40, 64, 0, torch.device("cpu"))
    with pytest.raises(BudgetError, match="cache_experts=a number of 401 digits"):
        Budget(cache_experts=10**400).slots(2**40, 64, 0, torch.device("cpu"))


@pytest.mark.parametrize("value", [math.inf, math.nan, 0, -1, 0.0, 10**6, 10**400, True, "5"])
def test_read_timeout_must_be_a_finite_positive_number(value):
    with pytest.raises(ConfigError, match="^read_timeout=.*above 0 and at most 86,400"):
        check_read_timeout(value)


def test_load_checks_read_timeout_first(tmp_path):
    with pytest.raises(ConfigError, match="^read_timeout=inf"):
        offload_moe.load(tmp_path / "no-such-model", read_timeout=math.inf)
    check_read_timeout(None)
    check_read_timeout(0.5)
