"""The small version of benchmarks/load_memory.py: loading grows RSS by at most dense + budget + 10% of the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "load_memory.py"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")
def test_load_memory_small(tmp_path):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(SCRIPT), "--size", "small", "--folder", str(tmp_path / "model"),
                    "--json", str(out)], check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert result["capacity_experts"] == result["total_experts"] // 4
    assert result["growth"] > 0
    assert result["growth"] <= result["dense_bytes"] + result["budget_bytes"] + result["checkpoint_bytes"] // 10, result
