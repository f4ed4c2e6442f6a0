"""The short version of benchmarks/soak.py: 300 decode steps, memory, fds and threads stay flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "soak.py"


@pytest.mark.slow
def test_soak_300_steps_is_flat(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--steps", "300", "--every", "100", "--warmup", "1",
                          "--device", "cpu", "--json", str(out)], capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert run.returncode == 0, (run.stderr[-2000:], report["verdict"])
    assert len(report["samples"]) == 3 and report["samples"][-1]["misses"] > 0
    v = report["verdict"]
    assert v["rss"]["worst_change"] <= 0.05 and v["fds"]["flat"] and v["threads"]["flat"]
