"""benchmarks/expert_kernels.py, run --quick on a tiny expert: every option measured, errors within bounds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "expert_kernels.py"

# Relative error of the expert's output against f32, per stored format (random weights, std 0.02).
BOUNDS = {"f32": 1e-6, "16-bit": 1e-2, "int8": 3e-2, "int4": 0.3}


def _script():
    spec = importlib.util.spec_from_file_location("expert_kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_quick_run_measures_every_option(tmp_path):
    script = _script()
    out = tmp_path / "kernels.json"
    report = script.main(["--quick", "--shapes", "tiny", "--threads", "1", "--working-set", "0.002",
                          "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["machine"]["torch"] and report["settings"]["threads"] == 1
    assert report["bandwidth"]["sum_gbps"] > 0 and report["bandwidth"]["mv_gbps"] > 0
    (shape,) = report["shapes"]
    rows = {row["option"]: row for row in shape["options"]}
    assert set(rows) == set(script.DEFAULT_OPTIONS)
    for name, row in rows.items():
        assert "skipped" not in row, name
        assert row["experts_cycled"] >= 2 and row["stored_bytes_per_expert"] > 0, name
        for t in ("1", "4"):
            timing = row["tokens"][t]
            assert timing["ms"] > 0 and timing["gbps"] > 0 and timing["x_bw"] > 0 and timing["rounds"] >= 1, name
        assert row["rel_err"] <= BOUNDS[row["family"]], (name, row["rel_err"])
        assert row["max_abs_err"] <= BOUNDS[row["family"]] * row["ref_max_abs"] * 4, name
    # Stored sizes: 16-bit is half of f32, int8 a quarter plus scales, int4 about an eighth plus group scales.
    f32 = rows["f32"]["stored_bytes_per_expert"]
    assert rows["bf16"]["stored_bytes_per_expert"] == f32 // 2
    assert f32 // 4 < rows["int8 mm"]["stored_bytes_per_expert"] < f32 // 3
    assert f32 // 8 < rows["int4 mm g128"]["stored_bytes_per_expert"] < rows["int4 mm g32"]["stored_bytes_per_expert"]
    assert set(script.picks(shape)) == {"f32", "16-bit", "int8", "int4"}


def test_group_sizes_that_do_not_divide_the_shape_are_skipped_with_a_reason(monkeypatch):
    script = _script()
    monkeypatch.setitem(script.SHAPES, "odd", (192, 96))  # 96 is not a multiple of 64 or 128
    report = script.main(["--shapes", "odd", "--threads", "1", "--working-set", "0.001", "--rounds", "1",
                          "--options", "bf16,int4 mm g32,int4 mm g128"])
    rows = {row["option"]: row for row in report["shapes"][0]["options"]}
    assert "multiple of the group size 128" in rows["int4 mm g128"]["skipped"]
    assert "skipped" not in rows["int4 mm g32"] and "skipped" not in rows["bf16"]


@pytest.mark.parametrize("argv, message", [(["--shapes", "nope"], "unknown shape"),
                                           (["--options", "int3"], "unknown kernel"),
                                           (["--threads", "0"], "at least 1")])
def test_bad_settings_name_the_flag(argv, message):
    with pytest.raises(SystemExit, match=message):
        _script().main(argv)
