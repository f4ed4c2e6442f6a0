"""A trace written in parts as it is recorded, so that a recording that is killed keeps what it had.

A chunked recording to ``PATH`` writes its rows, a part at a time, into the folder ``PATH.parts``
(``format.parts_folder``): each part ``part-NNNNNN.safetensors`` is a whole trace file of consecutive rows (whole
sequences), written atomically, and ``index.json`` lists the parts written so far, rewritten atomically after
each part. Killed at any moment, the folder is a valid trace of the parts its index lists: ``load_trace``,
``read_trace_chunks``, ``TraceFile`` and ``offload-moe profile --trace`` read it as one trace. When the recording
ends, the parts are joined into the one file ``PATH`` (``merge_trace_parts``, a copy of bytes in bounded memory)
and the folder is removed: the file holds what the recording would have saved whole.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from ..atomic import atomic_write
from ..errors import TraceError
from .format import FORMAT, PARTS_FORMAT, PARTS_INDEX, TENSORS, VERSION, Trace, TraceFile, parts_folder, save_trace

_COPY_BYTES = 16 * 2**20  # what a merge holds in memory at a time
_DTYPES = {torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.float32: "F32"}  # of TENSORS, as safetensors names them


class TraceParts:
    """The parts folder of a chunked recording to ``out``: ``append`` writes a part, ``finish`` joins them into
    ``out``. Refuses to start over the parts of an earlier recording that did not finish."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.folder = parts_folder(self.out)
        if self.folder.exists() or self.folder.is_symlink():
            raise TraceError(f"{self.folder} holds the parts of an earlier recording to {self.out} that did not finish; "
                             f"read them (they are a trace: offload-moe trace show {self.folder}), join them "
                             f"(offload-moe trace merge {self.folder} --out FILE), or remove the folder, then record again")
        self.names: list[str] = []
        self.tokens = 0  # rows written so far

    def append(self, trace: Trace) -> Path:
        """Write ``trace`` as the next part, then the index that lists it: a part is read only once whole."""
        name = f"part-{len(self.names):06d}.safetensors"
        path = save_trace(trace, self.folder / name)
        self.names.append(name)
        self.tokens += trace.num_tokens
        index = {"format": PARTS_FORMAT, "version": VERSION, "parts": self.names}
        atomic_write(self.folder / PARTS_INDEX, json.dumps(index, indent=1).encode())
        return path

    def finish(self) -> Path:
        """Join the parts into ``out`` and remove the folder; returns ``out``."""
        if not self.names:
            raise TraceError("nothing was recorded: run at least one forward pass inside the recorder")
        _join(TraceFile.open(self.folder), self.out)  # each part was checked as it was saved
        shutil.rmtree(self.folder)
        return self.out


def merge_trace_parts(folder: str | Path, out: str | Path) -> Path:
    """Join the parts folder ``folder`` (a chunked recording's) into the one trace file ``out``, atomically, copying
    bytes a few MB at a time: the file reads as ``load_trace(folder)`` does. The folder is left as it is. Its rows
    are checked first, a piece at a time, as ``load_trace`` checks them: a folder that does not read makes no file."""
    source = TraceFile.open(folder)
    _check_outside(source, Path(out))
    for _ in source.pieces(tensors=("predicted",)):  # each piece validated: expert ids, sequence lengths
        pass
    return _join(source, out)


def _join(source: TraceFile, out: str | Path) -> Path:
    """``source``'s parts, one tensor after another, copied into the one trace file ``out``."""
    header: dict = {"__metadata__": {**source.metadata, "format": FORMAT, "version": VERSION}}
    offset = 0
    names = [name for name in TENSORS if name in source.tensors]
    for name in names:
        infos = [part.infos[name] for part in source.parts]
        nbytes = sum(info.nbytes for info in infos)
        shape = [sum(info.shape[0] for info in infos), *infos[0].shape[1:]]
        header[name] = {"dtype": _DTYPES[infos[0].dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            for part in source.parts:
                _copy(part.infos[name].file, part.infos[name].offset, part.infos[name].nbytes, f)

    path = atomic_write(out, write)
    TraceFile.open(path)  # the header written is one a reader takes
    return path


def _check_outside(source: TraceFile, out: Path) -> None:
    """Refuse an ``out`` that would replace a file the merge reads (a part, the index) or lies in the parts folder."""
    target = out.resolve()
    read = {part.path.resolve() for part in source.parts} | ({source.path.resolve()} if source.path.is_dir() else set())
    if target in read or any(parent in read for parent in target.parents):
        raise TraceError(f"{out} would replace what the merge reads ({source.path}), which it leaves as it is; write "
                         "the joined trace to a file outside it")


def _copy(path: Path, offset: int, nbytes: int, out: BinaryIO) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        while nbytes > 0:
            block = f.read(min(nbytes, _COPY_BYTES))
            if not block:
                raise TraceError(f"{path} ended while it was being joined; it changed meanwhile, join the parts again")
            out.write(block)
            nbytes -= len(block)
