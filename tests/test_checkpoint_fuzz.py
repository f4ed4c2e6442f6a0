"""Fuzzing the checkpoint reader against the safetensors library, and the index and manifests on their own.

Headers are generated valid and then mutated (wrong types, overlaps, gaps, huge numbers, deep nesting, odd
unicode, duplicate keys, stray bytes). For each file: when the library refuses it, ``read_header`` refuses it
too, with a ``CheckpointError``; when ``read_header`` accepts it, every tensor's bytes, dtype and shape are the
library's. An unmutated header is always accepted. Index files and both manifests: accepted, or a
``CheckpointError`` / ``ModelPathError``, never another exception. Every example runs within a time limit.
"""

from __future__ import annotations

import json
import math
import re
import struct
import tempfile
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from offload_moe.checksums import read_manifest
from offload_moe.errors import CheckpointError, ModelPathError
from offload_moe.safetensors_io import write_safetensors as _write_safetensors
from offload_moe.saved_experts import FORMAT, MANIFEST, SavedExperts
from offload_moe.safetensors_io import FileReader, checkpoint_files, read_header

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SECONDS = 2.0  # per example, for our reader alone; generous on a busy machine, far below a hang

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I16": 2, "U8": 1}
NAMES = st.text(max_size=8) | st.sampled_from(["__metadata__", "", "a\x00b", "é", "\U0001f600", "model.w", " "])
HUGE = st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1])
SCALARS = st.none() | st.booleans() | st.integers(-3, 20) | HUGE | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=4)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)
RAW_VALUES = st.sampled_from(['[-0, 0]', '[0, 8.0]', '[1e2, 100]', '[0, -0]', '["0", "8"]', 'null', '[0, 8, 8]',
                              '{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}', '"\\ud800"', '[0, 1E1]'])


def data_bytes(n: int) -> bytes:
    return bytes((i * 37 + 11) % 256 for i in range(n))


@st.composite
def entries(draw):
    """A valid header as [name, entry] pairs in a drawn order, and the data length it covers."""
    names = draw(st.lists(NAMES.filter(lambda n: n != "__metadata__"), max_size=4, unique=True))
    out, offset = [], 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        out.append([name, {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}])
        offset += nbytes
    return draw(st.permutations(out)), offset


@st.composite
def safetensors_files(draw):
    """(file bytes, whether the header is the unmutated valid one)."""
    pairs, size = draw(entries())
    pairs = [[name, dict(entry)] for name, entry in pairs]
    mutation = draw(st.sampled_from(["none", "field", "element", "gap", "overlap", "shift", "drop", "extra", "size", "duplicate",
                                     "deep", "raw", "rawentry", "metadata", "padding", "length", "surrogate"]))
    texts = None
    pad_before, pad_after, length_delta = "", "", 0
    if mutation in ("field", "element", "gap", "overlap", "shift", "drop", "extra", "duplicate", "deep", "raw", "rawentry") and not pairs:
        mutation = "none"
    i = draw(st.integers(0, max(len(pairs) - 1, 0)))
    if mutation == "field":
        pairs[i][1][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
    elif mutation == "element":
        field = draw(st.sampled_from(["shape", "data_offsets"]))
        values = list(pairs[i][1][field]) or [0]
        values[draw(st.integers(0, len(values) - 1))] = draw(SCALARS)
        pairs[i][1][field] = values
    elif mutation in ("gap", "overlap"):  # this tensor and all after it move; nothing else is wrong
        begin = pairs[i][1]["data_offsets"][0]
        delta = draw(st.integers(1, 4)) * (1 if mutation == "gap" else -1)
        for _, entry in pairs:
            if entry["data_offsets"][0] >= begin:
                entry["data_offsets"] = [max(0, o + delta) for o in entry["data_offsets"]]
        size = max(0, size + delta)
    elif mutation == "shift":
        begin, end = pairs[i][1]["data_offsets"]
        delta = draw(st.integers(-4, 4).filter(bool))
        pairs[i][1]["data_offsets"] = draw(st.sampled_from([[begin + delta, end + delta], [begin, end + delta],
                                                            [begin + delta, end]]))
    elif mutation == "drop":
        del pairs[i][1][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif mutation == "extra":
        pairs[i][1][draw(st.text(max_size=4))] = draw(JSON)
    elif mutation == "size":
        size = max(0, size + draw(st.integers(-8, 8).filter(bool)))
    elif mutation == "metadata":
        pairs.insert(draw(st.integers(0, len(pairs))), ["__metadata__", draw(JSON | st.dictionaries(st.text(max_size=3),
                                                                                                  st.text(max_size=3)))])
    elif mutation == "padding":
        pad_before, pad_after = draw(st.sampled_from(["", " ", "\n\t", "\x00", "\x0b"])), draw(
            st.sampled_from(["", "   ", "\r\n", "\x00", "\x0c", "x"]))
    elif mutation == "length":
        length_delta = draw(st.integers(-4, 4).filter(bool))
    texts = [[json.dumps(name), json.dumps(entry)] for name, entry in pairs]
    if mutation == "duplicate":
        texts.insert(draw(st.integers(0, len(texts))), list(texts[i]))
    elif mutation == "deep":
        depth = draw(st.sampled_from([1, 127, 128, 129, 1000, 5000]))
        texts[i][1] = "[" * depth + "]" * depth
    elif mutation == "raw":  # numbers Python's json reads as integers or drops, and the library does not
        if draw(st.booleans()):
            i = min(range(len(pairs)), key=lambda j: pairs[j][1]["data_offsets"])  # begins at 0: "-0"
        begin, end = pairs[i][1]["data_offsets"]
        offsets = draw(st.sampled_from([f"[{begin}, {end}.0]", f"[{begin}e0, {end}]", f"[-{begin}, {end}]",
                                        f"[{begin}, -{end}]", f"[{begin}, {end}, {end}]", f"[{begin},{end}]"]))
        texts[i][1] = texts[i][1].replace(json.dumps([begin, end]), offsets)
    elif mutation == "rawentry":
        texts[i][1] = draw(RAW_VALUES)
    elif mutation == "surrogate":
        texts.append(['"\\ud800"', '{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'])
    raw = (pad_before + "{" + ",".join(f"{k}:{v}" for k, v in texts) + "}" + pad_after).encode()
    head = struct.pack("<Q", max(0, len(raw) + length_delta))
    return head + raw + data_bytes(size), mutation == "none"


def library_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """What the safetensors library reads from ``path``, or None where it refuses the file."""
    try:
        with safe_open(path, "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # SafetensorError, or torch refusing a shape the library let through
        return None


def timed(fn, *args):
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        assert time.perf_counter() - start < SECONDS, f"{fn.__name__} took too long"


@FUZZ
@given(safetensors_files())
def test_headers_agree_with_the_library(example):
    content, valid = example
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(content)
        want = library_tensors(path)
        try:
            ours = timed(read_header, path)
        except CheckpointError as e:
            assert str(path) in str(e)
            assert not valid, f"a valid header was refused: {e}"
            return
        assert want is not None, "the library refuses this file, and read_header accepted it"
        assert set(ours) == set(want)
        reader = FileReader()
        for name, info in ours.items():
            got = reader.read_tensor(info)
            assert got.dtype == want[name].dtype and got.shape == want[name].shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), want[name].reshape(-1).view(torch.uint8))
        reader.close()


SHARD_NAMES = st.sampled_from(["model-1.safetensors", "/etc/passwd", "../x.safetensors", "a/../../x.safetensors",
                               "sub/model-1.safetensors", "", ".", "missing.safetensors", "C:\\x", "model-1.safetensors\x00"])


@st.composite
def index_files(draw) -> bytes:
    kind = draw(st.sampled_from(["map", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40) | st.sampled_from([b"\xff\xfe{}", b"[" * 3000, b'{"weight_map":{},"weight_map":{}}']))
    if kind == "json":
        return json.dumps(draw(JSON | st.fixed_dictionaries({"weight_map": JSON}))).encode()
    weight_map = draw(st.dictionaries(st.text(max_size=4), SHARD_NAMES | SCALARS, max_size=4))
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


@FUZZ
@given(index_files())
def test_index_files_accepted_inside_the_folder_or_refused(content):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        (folder / "sub").mkdir(parents=True)
        (folder / "model-1.safetensors").write_bytes(b"x")
        (folder / "sub" / "model-1.safetensors").write_bytes(b"x")
        (Path(tmp) / "x.safetensors").write_bytes(b"x")
        (folder / "model.safetensors.index.json").write_bytes(content)
        try:
            files = timed(checkpoint_files, folder)
        except (CheckpointError, ModelPathError) as e:
            assert str(folder) in str(e)
            return
        assert all(f.resolve().is_relative_to(folder.resolve()) for f in files), files


def valid_store(folder: Path) -> dict:
    _write_safetensors(folder / "experts-00000.safetensors",
                       [(f"layers.0.experts.{e}.w", torch.full((2, 3), float(e))) for e in range(2)])
    return {"format": FORMAT, "version": 1, "layers": [
        {"id": 0, "module": "m", "file": "experts-00000.safetensors", "num_experts": 2,
         "params": {"w": {"shape": [2, 3], "dtype": "float32"}}}]}


def mutate(draw, value, depth: int = 0):
    """``value`` with one place in it (maybe itself) replaced by a drawn JSON value."""
    if depth > 4 or not isinstance(value, (dict, list)) or not value or draw(st.integers(0, 3)) == 0:
        return draw(JSON | SHARD_NAMES | HUGE)
    if isinstance(value, dict):
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: mutate(draw, value[key], depth + 1)}
    i = draw(st.integers(0, len(value) - 1))
    return [*value[:i], mutate(draw, value[i], depth + 1), *value[i + 1:]]


@FUZZ
@given(st.data())
def test_save_experts_manifests_accepted_or_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "store"
        folder.mkdir()
        manifest = mutate(data.draw, valid_store(folder))
        (folder / MANIFEST).write_text(json.dumps(manifest))
        try:
            store = timed(SavedExperts, folder)
        except CheckpointError as e:
            assert str(folder) in str(e)
            return
        assert all(p.file.resolve().is_relative_to(folder.resolve()) for ps in store.pieces.values() for p in ps)
        store.close()


DIGEST = "0" * 64


@FUZZ
@given(st.data())
def test_checksum_manifests_accepted_or_refused(data):
    valid = {"format": 1, "model": "m", "experts": {"0:0": DIGEST, "1:3": "ab" * 32}}
    kind = data.draw(st.sampled_from(["valid", "mutated", "experts"]))
    manifest = {"valid": lambda: valid, "mutated": lambda: mutate(data.draw, valid),
                "experts": lambda: {"format": 1, "experts": data.draw(JSON)}}[kind]()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "offload_moe.manifest.json"
        path.write_text(json.dumps(manifest))
        try:
            experts = timed(read_manifest, path)
        except CheckpointError as e:
            assert str(path) in str(e) and "delete it" in str(e)
            assert manifest != valid
            return
        assert all(re.fullmatch(r"[0-9]+:[0-9]+", k) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in experts.items())
