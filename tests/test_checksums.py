"""verify(): a checksum manifest of every expert, written atomically beside the model or elsewhere."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.checksums import MANIFEST, verify


@pytest.fixture
def model(model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_dir("mixtral"), dst)
    return dst


def test_first_run_writes_manifest_then_checks(model):
    first = verify(model)
    assert first.created and first.ok and first.experts == 12
    manifest = json.loads((model / MANIFEST).read_text())
    assert len(manifest["experts"]) == 12
    assert not [p for p in model.iterdir() if p.name.endswith(".tmp")]
    again = verify(model)
    assert not again.created and again.ok


def test_corrupted_expert_bytes_are_named(model):
    verify(model)
    f = model / "model.safetensors"
    from offload_moe.safetensors_io import read_header

    info = read_header(f)["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    with open(f, "r+b") as fh:  # flip one byte inside expert 2 of layer 1
        fh.seek(info.offset + 5)
        b = fh.read(1)
        fh.seek(info.offset + 5)
        fh.write(bytes([b[0] ^ 0xFF]))
    result = verify(model)
    assert not result.ok
    assert [(layer, expert) for layer, expert, _ in result.bad] == [(1, 2)]
    assert "model.safetensors" in result.bad[0][2]


def test_read_only_model_folder_needs_a_manifest_dir(model, monkeypatch):
    import offload_moe.checksums as v

    real_access = os.access
    monkeypatch.setattr(v.os, "access", lambda p, mode: False if str(p) == str(model) else real_access(p, mode))
    with pytest.raises(ConfigError, match="manifest_dir"):
        verify(model)
    assert not (model / MANIFEST).exists()


def test_manifest_in_another_folder(model, tmp_path):
    elsewhere = tmp_path / "manifests"
    result = verify(model, manifest_dir=elsewhere)
    assert result.created and (elsewhere / MANIFEST).exists() and not (model / MANIFEST).exists()
    assert verify(model, manifest_dir=elsewhere).ok


@pytest.mark.parametrize("content,match", [
    (b'{"format": 1, "experts": ["0:0"]}', "experts"),
    (b'{"format": 1, "experts": "0:0"}', "experts"),
    (b'{"format": 1}', "experts"),
    (b"[1]", "not a checksum manifest"),
    (b'{"format": 1, "experts": {"0:0": 5}}', "'0:0'"),
    (b'{"format": 1, "experts": {"0:0": "xyz"}}', "'0:0'"),
    (b'{"format": 1, "experts": {"a:b": "' + b"0" * 64 + b'"}}', "'a:b'"),
    (b'{"format": 1, "experts": {"' + b"9" * 5000 + b':0": "' + b"0" * 64 + b'"}}', "999"),
    (b'{"format": 1, "experts": {"\xd9\xa3:0": "' + b"0" * 64 + b'"}}', "entry"),
    (b'{"format": 1, "experts": {"\xff": 1}}', "not UTF-8"),
    (b'{"format": 1, "format": 1, "experts": {}}', "twice"),
])
def test_unreadable_manifest_says_delete_it(model, content, match):
    (model / MANIFEST).write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        verify(model)
    assert str(model / MANIFEST) in str(info.value) and "delete it to make a new one" in str(info.value)


def test_manifest_that_is_a_fifo_or_a_folder(model):
    os.mkfifo(model / MANIFEST)
    with pytest.raises(CheckpointError, match="not a regular file.*delete it"):
        verify(model)
    (model / MANIFEST).unlink()
    (model / MANIFEST).mkdir()
    with pytest.raises(CheckpointError, match="is a folder.*delete it"):
        verify(model)
