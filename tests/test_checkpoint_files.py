"""Reading a checkpoint as untrusted data: headers as strict as the safetensors library, shard names that
stay inside the model folder, and files that are not regular files or cannot be read, each a named error."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

from offload_moe.errors import CheckpointError, ModelPathError
from offload_moe.safetensors_io import FileReader, MappedFiles, checkpoint_files, read_header

A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
B = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
DATA = torch.arange(4, dtype=torch.float32).numpy().tobytes()


def write(path, header, data=DATA):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def library_reads(path) -> None:
    with safe_open(path, "pt") as f:
        for name in f.keys():
            f.get_tensor(name)


def test_valid_file_reads_the_library_bytes(tmp_path):
    path = write(tmp_path / "ok.safetensors", {"__metadata__": {"format": "pt"}, "b": B, "a": A})
    infos = read_header(path)
    reader = FileReader()
    with safe_open(path, "pt") as f:
        for name, info in infos.items():
            assert torch.equal(reader.read_tensor(info), f.get_tensor(name))
    reader.close()


# (case, header, data, what the message must name besides the file). Every one of these the library refuses too.
CORRUPT = [
    ("w2 shares w1's bytes", {"w1": A, "w2": A}, DATA[:8], "w2|w1"),
    ("offsets point into another tensor", {"a": {**A, "shape": [3], "data_offsets": [0, 12]}, "b": {**B, "data_offsets": [4, 12]}},
     DATA[:12], "'[ab]'"),
    ("duplicate key, other bytes", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
     b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', DATA, "'a' twice"),
    ("fractional offsets", {"a": {**A, "data_offsets": [0.0, 8.5]}}, DATA[:8], "'a'"),
    ("float shape", {"a": {**A, "shape": [2.0]}}, DATA[:8], "'a'"),
    ("string offsets", {"a": {**A, "data_offsets": ["0", "8"]}}, DATA[:8], "'a'"),
    ("bool shape", {"a": {**A, "shape": [True, 2]}}, DATA[:8], "'a'"),
    ("three offsets", {"a": {**A, "data_offsets": [0, 8, 8]}}, DATA[:8], "'a'"),
    ("a list as dtype", {"a": {**A, "dtype": ["F32"]}}, DATA[:8], "'a'"),
    ("unknown dtype", {"a": {**A, "dtype": "banana"}}, DATA[:8], "'a'"),
    ("entry is not an object", {"a": [0, 8]}, DATA[:8], "'a'"),
    ("missing field", {"a": {"dtype": "F32", "shape": [2]}}, DATA[:8], "'a'"),
    ("negative offset", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}', DATA[:8], "negative"),
    ("minus zero", b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[-0,0]}}', b"", "negative"),
    ("size disagrees with shape", {"a": {**A, "shape": [3]}}, DATA[:8], "'a'"),
    ("gap before a tensor", {"a": {**A, "data_offsets": [4, 12]}}, DATA[:12], "'a'"),
    ("gap between tensors", {"a": A, "b": {**B, "data_offsets": [12, 20]}}, DATA + DATA[:4], "'b'"),
    ("bytes after the last tensor", {"a": A}, DATA, "after its last tensor"),
    ("truncated", {"a": A, "b": B}, DATA[:12], "truncated"),
    ("shape overflows 64 bits before a zero", {"a": {**A, "shape": [2**63, 4, 0], "data_offsets": [0, 0]}}, b"", "'a'"),
    ("number of 5,000 digits", b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}',
     DATA[:8], "digits"),
    ("nested arrays beyond recursion", b"[" * 100_000 + b"]" * 100_000, b"", "nests"),
    ("not an object", b"[]", b"", "not an object"),
    ("metadata not strings", {"__metadata__": {"format": 1}, "a": A}, DATA[:8], "__metadata__"),
    ("lone surrogate in a name", b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', DATA[:8],
     "not valid unicode"),
    ("not UTF-8", b'{"\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', DATA[:8], "UTF-8"),
    ("trailing garbage", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}[', DATA[:8], "JSON"),
]


@pytest.mark.parametrize("case,header,data,names", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_header_refused_like_the_library(tmp_path, case, header, data, names):
    path = write(tmp_path / "model.safetensors", header, data)
    with pytest.raises(SafetensorError):
        library_reads(path)
    with pytest.raises(CheckpointError, match=names) as info:
        read_header(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("head", [b"", b"\x01\x00", struct.pack("<Q", 2**40) + b"{}", struct.pack("<Q", 200_000_000) + b"{}"])
def test_short_file_or_huge_length_field(tmp_path, head):
    path = tmp_path / "model.safetensors"
    path.write_bytes(head)
    with pytest.raises(SafetensorError):
        library_reads(path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_header(path)


def test_duplicate_tensor_name_refused_where_the_library_keeps_the_last(tmp_path):
    """safetensors 0.8 accepts a name given twice (the last entry wins); a second meaning for a name is refused here."""
    raw = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    path = write(tmp_path / "model.safetensors", raw, DATA[:8])
    library_reads(path)
    with pytest.raises(CheckpointError, match="'a' twice"):
        read_header(path)


def test_zero_sized_tensors_and_metadata_null_are_valid(tmp_path):
    header = {"__metadata__": None, "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}, "a": A,
              "s": {"dtype": "F32", "shape": [], "data_offsets": [8, 12]}}
    path = write(tmp_path / "model.safetensors", header, DATA[:12])
    library_reads(path)
    assert {n: i.shape for n, i in read_header(path).items()} == {"e": (0,), "a": (2,), "s": ()}


def test_a_zero_sized_tensor_inside_another_is_refused(tmp_path):
    path = write(tmp_path / "model.safetensors", {"a": A, "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}},
                 DATA[:8])
    with pytest.raises(SafetensorError):
        library_reads(path)
    with pytest.raises(CheckpointError, match="'a'.*overlap|overlap.*'a'"):
        read_header(path)


def finishes(fn, seconds=10.0):
    """Run ``fn`` in a thread; the exception it raised, or fail if it does not return in time (a hang)."""
    out = {}

    def run():
        try:
            fn()
        except BaseException as e:  # handed to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} hung"
    return out.get("error")


def test_fifo_is_refused_not_hung(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    error = finishes(lambda: read_header(fifo))
    assert isinstance(error, CheckpointError) and "not a regular file" in str(error) and str(fifo) in str(error)
    error = finishes(lambda: FileReader()._fd(fifo))
    assert isinstance(error, CheckpointError) and str(fifo) in str(error)
    error = finishes(lambda: MappedFiles().tensor(fifo, 0, torch.float32, (2,)))
    assert isinstance(error, CheckpointError) and "not a regular file" in str(error)


def test_folder_named_like_a_shard(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors is a folder"):
        read_header(tmp_path / "model.safetensors")


def deny(monkeypatch, target, call="open"):
    """Make ``os.<call>`` of ``target`` fail as it does for a file without read permission.

    The tests run as root here, which reads any file whatever its mode, so ``chmod 000`` proves nothing:
    the refusal the kernel gives a normal user is reproduced at the system call instead."""
    real = getattr(os, call)

    def fake(path, *args, **kw):
        if os.fspath(path) == os.fspath(target):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(os, call, fake)


def test_unreadable_shard_at_index_time_and_at_read_time(tmp_path, monkeypatch):
    path = write(tmp_path / "model.safetensors", {"a": A, "b": B})
    infos = read_header(path)
    deny(monkeypatch, path)
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read: permission denied"):
        read_header(path)
    for io in ("buffered", "direct"):
        reader = FileReader(io)
        with pytest.raises(CheckpointError, match="model.safetensors cannot be read: permission denied"):
            reader.read_tensor(infos["a"])
        reader.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode; see the monkeypatched test")
def test_chmod_000_shard(tmp_path):
    path = write(tmp_path / "model.safetensors", {"a": A, "b": B})
    path.chmod(0)
    with pytest.raises(CheckpointError, match="permission denied"):
        read_header(path)


def test_read_error_names_the_file(tmp_path, monkeypatch):
    path = write(tmp_path / "model.safetensors", {"a": A, "b": B})
    info = read_header(path)["b"]

    def eio(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", eio)
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read at byte .*Input/output error"):
        FileReader().read_tensor(info)


# -- the index: shard names stay inside the folder ---------------------------------------------------------


def model_folder(tmp_path, weight_map, shard="model-1.safetensors"):
    folder = tmp_path / "model"
    folder.mkdir()
    write(folder / shard, {"a": A, "b": B})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                  "..\\outside.safetensors", "C:/x.safetensors", "a\x00b", ""])
def test_index_naming_a_file_outside_is_refused(tmp_path, name, monkeypatch):
    write(tmp_path / "outside.safetensors", {"a": A, "b": B})
    folder = model_folder(tmp_path, {"a": "model-1.safetensors", "b": name})
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_open(p, *a, **k))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json") as info:
        checkpoint_files(folder)
    assert "outside" in str(info.value) or "non-empty" in str(info.value)
    assert opened and all(Path(p).resolve().is_relative_to(folder.resolve()) for p in opened), opened


@pytest.mark.parametrize("index", [
    {"weight_map": ["model-1.safetensors"]},
    {"weight_map": {"a": 1}},
    {"weight_map": {"a": ["model-1.safetensors"]}},
    {"weight_map": "model-1.safetensors"},
    {"metadata": {}},
    [1, 2],
])
def test_index_of_wrong_types(tmp_path, index):
    folder = model_folder(tmp_path, {})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index.*model.safetensors.index.json.*weight_map"):
        checkpoint_files(folder)


@pytest.mark.parametrize("content,match", [(b'{"weight_map": {"a": "\xff.safetensors"}}', "not UTF-8"),
                                           (b'{"weight_map": {}, "weight_map": {}}', "twice"),
                                           (b"[" * 50_000, "nests|not valid JSON")])
def test_index_not_utf8_duplicate_or_deep(tmp_path, content, match):
    folder = model_folder(tmp_path, {})
    (folder / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        checkpoint_files(folder)


def test_index_is_a_fifo_or_folder(tmp_path):
    folder = model_folder(tmp_path, {})
    index = folder / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    error = finishes(lambda: checkpoint_files(folder))
    assert isinstance(error, CheckpointError) and "not a regular file" in str(error)
    index.unlink()
    index.mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        checkpoint_files(folder)


def test_symlinked_shard_is_allowed(tmp_path):
    """The Hugging Face cache keeps shards as links into a blobs folder: the name is judged, not the target."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    write(blobs / "abc123", {"a": A, "b": B})
    folder = model_folder(tmp_path, {"a": "model-1.safetensors", "b": "model-1.safetensors"})
    (folder / "model-1.safetensors").unlink()
    (folder / "model-1.safetensors").symlink_to(blobs / "abc123")
    [shard] = checkpoint_files(folder)
    assert shard == folder / "model-1.safetensors" and set(read_header(shard)) == {"a", "b"}


def test_folder_that_cannot_be_searched(tmp_path, monkeypatch):
    """A folder without execute permission: stat of anything in it fails (emulated, as root passes the check)."""
    folder = model_folder(tmp_path, {"a": "model-1.safetensors", "b": "model-1.safetensors"})
    deny(monkeypatch, folder / "model.safetensors.index.json", call="lstat")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json cannot be reached: Permission denied"):
        checkpoint_files(folder)


def test_folder_that_cannot_be_listed(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    deny(monkeypatch, folder, call="scandir")
    with pytest.raises(ModelPathError, match="cannot be listed: Permission denied"):
        checkpoint_files(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches any folder whatever its mode; see the emulated test")
def test_folder_without_execute_permission(tmp_path):
    folder = model_folder(tmp_path, {"a": "model-1.safetensors", "b": "model-1.safetensors"})
    folder.chmod(0o600)
    try:
        with pytest.raises(CheckpointError, match="Permission denied"):
            checkpoint_files(folder)
    finally:
        folder.chmod(0o700)
        shutil.rmtree(folder)
