"""End to end: a model folder whose index names a file outside it is refused by load and verify, and nothing
outside the folder is opened; the command prints one line."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import offload_moe
from offload_moe.checksums import verify
from offload_moe.errors import CheckpointError


@pytest.fixture
def outside(tmp_path):
    return tmp_path / "x.safetensors"


def escaping_model(model_dir, tmp_path, shard: str) -> Path:
    """The tiny mixtral with an index whose last tensor lives in ``shard``; a valid copy waits outside the folder."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir("mixtral"), folder)
    shutil.copy(folder / "model.safetensors", tmp_path / "x.safetensors")
    from offload_moe.safetensors_io import read_header

    names = sorted(read_header(folder / "model.safetensors"))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[-1]] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def opened(monkeypatch):
    """Every path handed to os.open or open while the test runs."""
    paths: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, *args, **kw):
        paths.append(os.fspath(path))
        return real_os_open(path, *args, **kw)

    def open_(file, *args, **kw):
        if isinstance(file, (str, bytes, os.PathLike)):
            paths.append(os.fsdecode(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    return paths


@pytest.mark.parametrize("shard", ["/etc/passwd", "../x.safetensors"])
def test_load_and_verify_refuse_a_shard_outside_and_open_nothing_there(model_dir, tmp_path, shard, opened):
    folder = escaping_model(model_dir, tmp_path, shard)
    forbidden = {Path("/etc/passwd").resolve(), (tmp_path / "x.safetensors").resolve()}
    opened.clear()  # making the folder copied the outside file; from here on nothing may open it
    for fn in (offload_moe.load, verify):
        with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json names the file '{shard}', "
                                                  "which lies outside"):
            fn(folder)
    assert opened, "the test saw no file opened at all"
    assert not [p for p in opened if Path(p).resolve() in forbidden]
    assert not (folder / "offload_moe.manifest.json").exists()


def test_cli_prints_one_line(model_dir, tmp_path):
    folder = escaping_model(model_dir, tmp_path, "../x.safetensors")
    result = subprocess.run([sys.executable, "-m", "offload_moe", "verify", str(folder)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(offload_moe.__file__).parent.parent)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "lies outside" in lines[0] and "../x.safetensors" in lines[0], result.stderr
