"""Sweeps on Ray (profiling.sweeps, `offload-moe profile --ray`): the same results as a local sweep, from a local Ray
of 2 CPUs that the tests start and stop. Ray is an optional dependency (offload_moe[cluster], about 240 MB): without
it the tests that need it are skipped."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import psutil
import pytest
from typer.testing import CliRunner

from offload_moe.cli import app
from offload_moe.errors import ConfigError
from offload_moe.policies import POLICIES
from offload_moe.profiling import sweep, write_results
from offload_moe.traces import save_trace, synthesize_trace


def have_ray() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except ValueError:  # sys.modules["ray"] is None: imports of it are blocked
        return False


needs_ray = pytest.mark.skipif(not have_ray(), reason="Ray is not installed (pip install 'offload_moe[cluster]')")

GRID = {"policies": ["lru", "lfu", "fifo", "random"], "capacities": [6, 12], "predictors": ["none", "transition"]}


@pytest.fixture(scope="module")
def trace():
    return synthesize_trace(tokens=200, layers=4, num_experts=16, top_k=2, skew=1.0, locality=0.3, sequences=2, seed=3)


def ray_processes() -> list[str]:
    """Ray's daemons and workers among this process's children."""
    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            text = " ".join(child.cmdline()).lower()
        except psutil.Error:
            continue
        if "ray" in text:
            names.append(text[:80])
    return names


def no_ray_left() -> list[str]:
    for _ in range(50):  # the daemons take a moment to exit after ray.shutdown
        left = ray_processes()
        if not left:
            return []
        time.sleep(0.2)
    return left


def without_timing(document: dict) -> dict:
    return {k: v for k, v in document.items() if k not in ("seconds", "date")}


@needs_ray
@pytest.mark.slow
def test_the_cli_on_a_local_ray_writes_the_results_of_a_local_sweep(tmp_path, trace):
    """`profile --ray` starts a local Ray of --workers CPUs, runs each replay as a task, stops Ray again and
    writes the same results.json as the sweep in one process, every field but the timing."""
    import ray

    path = save_trace(trace, tmp_path / "trace.safetensors")
    common = ["profile", "--trace", str(path), "--policies", ",".join(GRID["policies"]),
              "--capacities", ",".join(map(str, GRID["capacities"])), "--predictors", ",".join(GRID["predictors"]),
              "--no-plots"]
    local = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "local"), "--workers", "1"])
    assert local.exit_code == 0, local.output
    on_ray = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2"])
    assert on_ray.exit_code == 0, on_ray.output
    assert not ray.is_initialized()
    assert no_ray_left() == []
    expected = json.loads((tmp_path / "local" / "results.json").read_text())
    got = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert len(got["results"]) == 2 * (1 + 4 * 2)
    assert without_timing(got) == without_timing(expected)
    assert (tmp_path / "ray" / "results.csv").read_text() == (tmp_path / "local" / "results.csv").read_text()


@needs_ray
@pytest.mark.slow
def test_a_sweep_uses_a_ray_the_caller_started_and_leaves_it_running(tmp_path, trace):
    """Each worker reads the trace from the object store once (a list of references is not resolved per task);
    progress is called once per replay; the caller's Ray is still up afterwards, and stopped by the caller."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ticks: list[int] = []
        got = sweep(trace, **GRID, ray=True, progress=ticks.append)
        assert ray.is_initialized()
        expected = sweep(trace, **GRID)
        assert [r.as_dict() for r in got] == [r.as_dict() for r in expected]
        assert sum(ticks) == len(expected)
        a = write_results(got, trace, tmp_path / "a", plots=False)["json"]
        b = write_results(expected, trace, tmp_path / "b", plots=False)["json"]
        assert without_timing(json.loads(a.read_text())) == without_timing(json.loads(b.read_text()))
    finally:
        ray.shutdown()
    assert no_ray_left() == []


def test_a_sweep_on_ray_without_ray_installed_says_what_to_install(monkeypatch, trace):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r"offload_moe\[cluster\]"):
        sweep(trace, policies=["lru"], capacities=[4], ray=True)


def test_a_policy_added_at_run_time_is_refused_on_ray(monkeypatch, trace):
    """Ray's workers import offload_moe afresh: a policy registered in this process only would be unknown there."""
    monkeypatch.setitem(POLICIES, "mine", type("Mine", (POLICIES["lru"],), {}))
    with pytest.raises(ConfigError, match="'mine' was added at run time"):
        sweep(trace, policies=["mine"], capacities=[4], ray=True)


def test_an_empty_ray_address_is_refused(trace):
    with pytest.raises(ConfigError, match="the Ray address is empty"):
        sweep(trace, policies=["lru"], capacities=[4], ray="")
