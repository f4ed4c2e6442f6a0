"""benchmarks/busy_threads.py: one round beside one spinning process, the thread count measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "busy_threads.py"


@pytest.mark.slow
def test_one_round_reports_each_thread_count(tmp_path):
    out = tmp_path / "busy.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--busy", "1", "--threads", "1", "--rounds", "1",
                           "--tokens", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["busy"] == 1 and set(row["tokens_per_s"]) == {"1"}
    assert all(len(v) == 1 and v[0] > 0 for v in row["tokens_per_s"].values())
    assert "| 1 |" in done.stdout  # the table's row
