"""A save_experts folder read back as untrusted data: every manifest field checked, files kept inside the folder."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.safetensors_io import write_safetensors as _write_safetensors
from offload_moe.saved_experts import FORMAT, MANIFEST, SavedExperts, _uncommit

LAYER = {"id": 0, "module": "blocks.0.moe", "file": "experts-00000.safetensors", "num_experts": 2,
         "params": {"w": {"shape": [2, 3], "dtype": "float32"}}}


def make_store(folder, layer=LAYER, tensors=None):
    folder.mkdir(exist_ok=True)
    tensors = tensors or [(f"layers.0.experts.{e}.w", torch.full((2, 3), float(e))) for e in range(2)]
    _write_safetensors(folder / "experts-00000.safetensors", tensors)
    manifest = {"format": FORMAT, "version": 1, "layers": [layer]}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_valid_store_reads(tmp_path):
    store = SavedExperts(make_store(tmp_path / "s"))
    assert store.layers[0].num_experts == 2 and store.layers[0].shapes == {"w": (2, 3)}
    out = torch.empty(2, 3)
    store.read_piece(store.expert_pieces(0, 1)[0], out)
    assert torch.equal(out, torch.ones(2, 3))
    store.close()


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "a/../../outside.safetensors", ""])
def test_manifest_file_outside_the_folder_is_refused(tmp_path, name, monkeypatch):
    make_store(tmp_path / "outside_store")  # a valid file the manifest may not reach
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "outside_store" / "experts-00000.safetensors").read_bytes())
    folder = make_store(tmp_path / "s", {**LAYER, "file": name})
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_open(p, *a, **k))
    with pytest.raises(CheckpointError, match=r"experts.json.*layers\[0\]\.file"):
        SavedExperts(folder)
    assert opened and all(Path(p).resolve().is_relative_to(folder.resolve()) for p in opened), opened


WRONG = [
    ("layers", {"layers": "x"}, "layers"),
    ("layers", {"layers": {"0": LAYER}}, "layers"),
    ("entry", {"layers": [[1, 2]]}, r"layers\[0\]"),
    ("id string", {"layers": [{**LAYER, "id": "0"}]}, r"layers\[0\]\.id"),
    ("id bool", {"layers": [{**LAYER, "id": True}]}, r"layers\[0\]\.id"),
    ("id negative", {"layers": [{**LAYER, "id": -1}]}, r"layers\[0\]\.id"),
    ("num_experts huge", {"layers": [{**LAYER, "num_experts": 10**30}]}, r"layers\[0\]\.num_experts"),
    ("num_experts float", {"layers": [{**LAYER, "num_experts": 2.0}]}, r"layers\[0\]\.num_experts"),
    ("module", {"layers": [{**LAYER, "module": ["m"]}]}, r"layers\[0\]\.module"),
    ("params list", {"layers": [{**LAYER, "params": ["w"]}]}, r"layers\[0\]\.params"),
    ("param not object", {"layers": [{**LAYER, "params": {"w": [2, 3]}}]}, r"layers\[0\]\.params"),
    ("shape string", {"layers": [{**LAYER, "params": {"w": {"shape": "2x3"}}}]}, r"params\.w\.shape"),
    ("shape float", {"layers": [{**LAYER, "params": {"w": {"shape": [2.5, 3]}}}]}, r"params\.w\.shape"),
    ("file int", {"layers": [{**LAYER, "file": 7}]}, "7"),
    ("twice", {"layers": [LAYER, LAYER]}, r"layers\[1\]"),
    ("format", {"format": "other"}, "not a save_experts manifest"),
]


@pytest.mark.parametrize("case,change,match", WRONG, ids=[w[0] for w in WRONG])
def test_manifest_fields_of_wrong_type(tmp_path, case, change, match):
    folder = make_store(tmp_path / "s")
    manifest = {**json.loads((folder / MANIFEST).read_text()), **copy.deepcopy(change)}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=match) as info:
        SavedExperts(folder)
    assert str(folder / MANIFEST) in str(info.value)


@pytest.mark.parametrize("content,match", [(b'{"format": "\xff"}', "not UTF-8"), (b"[" * 50_000, "nests|not valid JSON"),
                                           (b'{"format": 1, "format": 2}', "twice"), (b"", "not valid JSON")])
def test_manifest_unreadable(tmp_path, content, match):
    folder = make_store(tmp_path / "s")
    (folder / MANIFEST).write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        SavedExperts(folder)


def test_manifest_that_is_a_fifo_or_a_folder(tmp_path):
    folder = make_store(tmp_path / "s")
    (folder / MANIFEST).unlink()
    os.mkfifo(folder / MANIFEST)
    with pytest.raises(CheckpointError, match="not a regular file"):
        SavedExperts(folder)
    with pytest.raises(CheckpointError, match="not a regular file"):
        _uncommit(folder)
    (folder / MANIFEST).unlink()
    (folder / MANIFEST).mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        SavedExperts(folder)


def test_uncommit_refuses_what_is_not_ours_and_keeps_it(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for content, error in [(b"[1, 2]", ConfigError), (b'"a string"', ConfigError), (b'{"format": "x"}', ConfigError),
                           (b"\xff\xfe", CheckpointError)]:
        (folder / MANIFEST).write_bytes(content)
        with pytest.raises(error, match="experts.json"):
            _uncommit(folder)
        assert (folder / MANIFEST).read_bytes() == content


@pytest.mark.parametrize("name", ["layers.0.experts." + "9" * 5000 + ".w", "layers.0.experts.\u0663.w",
                                  "layers.0.experts.1000000000.w"])
def test_tensor_name_with_an_absurd_expert_number(tmp_path, name):
    """No manifest (one file as the store): a number beyond any count is refused, never looped over or int()'d."""
    folder = tmp_path / "s"
    folder.mkdir()
    _write_safetensors(folder / "one.safetensors", [("layers.0.experts.0.w", torch.zeros(2)), (name, torch.zeros(2))])
    with pytest.raises(CheckpointError, match="one.safetensors"):
        SavedExperts(folder / "one.safetensors")


def test_expert_number_beyond_the_tensor_count(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    _write_safetensors(folder / "one.safetensors", [("layers.0.experts.0.w", torch.zeros(2)),
                                                    ("layers.0.experts.99999.w", torch.zeros(2))])
    with pytest.raises(CheckpointError, match="expert 99999, but the file holds only 2 tensors"):
        SavedExperts(folder / "one.safetensors")


def test_store_path_that_is_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "store.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        SavedExperts(tmp_path / "store.safetensors")
