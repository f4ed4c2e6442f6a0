"""Read safetensors headers and byte ranges ourselves: validated and read-only.

Reading with ``os.preadv`` into a caller's buffer lets an expert land directly in
its slot (or a reused staging buffer), keeps the process's resident memory at what
it asked for, and releases the GIL while the disk works. ``O_DIRECT`` reads whole
blocks: given a buffer with room for them (``span``, ``FileReader.read_span``) the
disk fills it in place; into an exact destination only the partial blocks at its
ends (or all, when its address and the file offset disagree, ``SCRATCH_BYTES`` at a time) go through scratch.

``MappedFiles`` is the other way in, for ``io="mmap"`` on CPU: tensors that view a
private (copy-on-write) mapping of the file, so compute reads the page cache in place
and nothing written to them can reach the file.

``write_safetensors`` is the one writer of a safetensors file (save_experts, quantize_experts), through atomic.py.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import CheckpointError, ConfigError, ModelClosedError, ModelPathError
from .files import REFUSED_FLAGS, inside, open_fd, open_regular, parse_json, read_json
from .values import READ_MODES, shown

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
_U64 = 2**64  # the library reads shapes and offsets as 64-bit unsigned integers
_TORCH_DIM = 2**63  # torch sizes are signed 64-bit
_FIELDS = {"dtype", "shape", "data_offsets"}
short_repr = functools.partial(shown, limit=200)  # a value read from a file (a tensor name), cut short for a message


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file`` at absolute byte ``offset``, ``nbytes`` long."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors file's header as strictly as the safetensors library does.

    Only a regular file is opened. The header is strict JSON (no duplicate keys, no negative or
    fractional numbers); each entry is exactly ``dtype``, ``shape`` and ``data_offsets`` with sizes
    that agree; sorted by offset, the tensors cover the data region once, in order, with no
    overlap and no gap, up to the end of the file. Anything else is a ``CheckpointError``
    naming the file (and the tensor, where one is at fault).
    """
    with open_regular(path, "checkpoint file") as f:
        size = os.fstat(f.fileno()).st_size
        n = _header_length(path, _read(f, path, 8, size), size)
        raw = _read(f, path, n, size)
    try:
        header = parse_json(raw, "the header", parse_int=_header_int)
    except CheckpointError as e:
        raise _corrupt(path, str(e).removesuffix("; it is corrupted")) from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"it is a JSON {type(header).__name__}, not an object")
    _check_metadata(path, header.pop("__metadata__", None))
    tensors = [_tensor_info(path, name, entry, 8 + n) for name, entry in header.items()]
    _check_layout(path, tensors, 8 + n, size - 8 - n)
    return {t.name: t for t in tensors}


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} has a corrupted safetensors header: {why}; re-download or re-save this file")


def _read(f, path: Path, n: int, size: int) -> bytes:
    try:
        data = f.read(n)
    except OSError as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {e.strerror or e}") from None
    if len(data) < n:
        raise CheckpointError(f"{path} is not a safetensors file: it is only {size} bytes long")
    return data


def _header_length(path: Path, head: bytes, size: int) -> int:
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise _corrupt(path, f"the length field says {n} bytes, the file has {size}")
    return n


def _header_int(text: str) -> int:
    """Integers as the library reads them: never negative (not even -0), at most 64 bits."""
    if text.startswith("-"):
        raise CheckpointError(f"the header holds the negative number {text[:24]}; sizes and offsets never are")
    if len(text) > 20:
        raise CheckpointError(f"the header holds a number of {len(text)} digits, more than 64 bits hold")
    return int(text)


def _check_metadata(path: Path, meta: object) -> None:
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _corrupt(path, f"__metadata__ is {short_repr(meta)}, not a map of strings to strings")
    for text in (*meta, *meta.values()):
        _check_utf8(path, text, "__metadata__")


def _check_utf8(path: Path, text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written as a \u escape
        raise _corrupt(path, f"{where} holds {short_repr(text)}, which is not valid unicode") from None


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < _U64  # bool and float are not sizes


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {short_repr(name)}"
    _check_utf8(path, name, "a tensor name")
    if not isinstance(entry, dict) or set(entry) != _FIELDS:
        raise CheckpointError(f"{where} has a malformed header entry {short_repr(entry)}; an entry holds exactly "
                              "dtype, shape and data_offsets. The file is corrupted, re-download or re-save it")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CheckpointError(f"{where} has dtype {short_repr(dtype_name)}, which offload_moe cannot read "
                              f"(it reads {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise CheckpointError(f"{where} has shape {short_repr(shape)}; a shape is a list of non-negative integers. "
                              "The file is corrupted")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise CheckpointError(f"{where} has data_offsets {short_repr(offsets)}; they are two non-negative integers. "
                              "The file is corrupted")
    begin, end = offsets
    dtype = DTYPES[dtype_name]
    expected = _nbytes(where, shape, dtype)
    if end - begin != expected:
        raise CheckpointError(
            f"{where} spans bytes {begin}..{end} but its shape {short_repr(shape)} and dtype {dtype_name} "
            f"need {expected}; the file is corrupted"
        )
    return TensorInfo(name, path, data_start + begin, expected, dtype, tuple(shape))


def _nbytes(where: str, shape: list[int], dtype: torch.dtype) -> int:
    """Bytes of ``shape`` x ``dtype``, refused where the library's 64-bit product overflows or torch cannot size it."""
    numel = 1
    for d in shape:  # in order, as the library multiplies: an overflow before a 0 is still an overflow
        numel *= d
        if numel >= _U64 or d >= _TORCH_DIM:
            raise CheckpointError(f"{where} has shape {short_repr(shape)}, larger than any tensor can be; "
                                  "the file is corrupted")
    nbytes = numel * dtype.itemsize
    if nbytes >= _U64:
        raise CheckpointError(f"{where} has shape {short_repr(shape)}, larger than any tensor can be; "
                              "the file is corrupted")
    return nbytes


def _check_layout(path: Path, tensors: list[TensorInfo], data_start: int, data_size: int) -> None:
    """Sorted by offset, the tensors must tile the data region: each starts where the one before ends."""
    end, previous = 0, None
    for t in sorted(tensors, key=lambda t: (t.offset, t.nbytes)):
        start = t.offset - data_start
        if start != end:
            before = "the data's start" if previous is None else f"the end of {short_repr(previous)} at byte {end}"
            raise CheckpointError(
                f"{path}: tensor {short_repr(t.name)} starts at byte {start} of the data, "
                f"{'before' if start < end else 'after'} {before}: tensors {'overlap' if start < end else 'leave a gap'}. "
                "A safetensors file holds each tensor's bytes once, in order; the file is corrupted, re-download or "
                "re-save it"
            )
        end, previous = start + t.nbytes, t.name
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {short_repr(previous)} ends at byte {data_start + end} but the file has "
            f"{data_start + data_size} bytes; re-download this shard"
        )
    if end < data_size:
        raise CheckpointError(
            f"{path} has {data_size - end} bytes after its last tensor, which a safetensors file never has; "
            "the file is corrupted or was appended to, re-download or re-save it"
        )


DATA_ALIGN = 64  # where write_safetensors starts a file's tensor data


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None, *,
                      aligned: bool = False) -> Path:
    """Stream ``tensors`` (cast to ``dtype``) into the safetensors file ``path`` one at a time, atomically
    (``atomic_write``: flushed to disk, mode 0o644), with no copy of the set; metadata ``{"format": "pt"}``; the
    tensor data starts at a multiple of ``DATA_ALIGN`` bytes.
    ``aligned``: in order of element size, largest first (stable), as the safetensors library orders them, so that
    each tensor's bytes start at a multiple of its element size; else in the order given."""
    tensors = list(tensors)
    if aligned:
        tensors.sort(key=lambda item: -(dtype or item[1].dtype).itemsize)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors:
        out = dtype or t.dtype
        nbytes = t.numel() * out.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[out], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # The data starts 64-byte aligned (the format asks for 8): mapped views of tensors whose sizes are multiples of 64
    # bytes start on a cache line, which torch's int8 CPU kernel needs (kernels.PACKED_ALIGN)
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)

    def write(f) -> None:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, t in tensors:
            f.write(t.detach().to("cpu", dtype or t.dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data)

    return atomic_write(path, write)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: from ``model.safetensors.index.json`` if present, else ``*.safetensors``.

    Shard names in the index are untrusted: each must name a file inside ``folder`` (a symlinked
    shard, as the Hugging Face cache keeps them, is fine; ``/etc/passwd`` or ``../x`` is not).
    """
    index = folder / "model.safetensors.index.json"
    if _present(index):
        names = _shard_names(index)
        paths = [inside(folder, n, f"safetensors index {index}") for n in names]
        missing = [n for n, p in zip(names, paths) if not _present(p, follow=True)]
        if missing:
            raise CheckpointError(
                f"{folder}: shard(s) {', '.join(missing)} named in {index.name} are missing; "
                "download the complete checkpoint"
            )
        return paths
    try:
        files = sorted(folder / e.name for e in os.scandir(folder) if e.name.endswith(".safetensors"))
    except OSError as e:
        raise ModelPathError(f"{folder} cannot be listed: {e.strerror or e}; make it readable (chmod +rx)") from None
    if not files:
        raise ModelPathError(
            f"{folder} has no .safetensors files; offload_moe reads safetensors checkpoints "
            "(convert .bin weights with transformers' save_pretrained)"
        )
    return files


def _shard_names(index: Path) -> list[str]:
    """The distinct file names of an index's ``weight_map``, checked to be a map of tensor names to file names."""
    data = read_json(index, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"safetensors index {index} has no weight_map of tensor names to file names "
            f"(found {short_repr(weight_map)}); re-download it"
        )
    return sorted(set(weight_map.values()))


def _present(path: Path, follow: bool = False) -> bool:
    """Whether ``path`` exists; an error other than "not there" (permission denied on a folder) is raised, named."""
    try:
        os.stat(path) if follow else os.lstat(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise CheckpointError(f"{path} cannot be reached: {e.strerror or e}; make its folder readable (chmod +rx)") from None


DIRECT_ALIGN = 4096  # O_DIRECT: file offset, length and address on a multiple of the logical block size (512 or 4096)
# O_DIRECT bytes that cannot land in place go through a per-thread scratch buffer this many bytes at a time, so that
# a reader thread keeps 8 MiB, not the largest tensor it ever read (a Mixtral-8x7B expert's gate_up: 224 MiB)
SCRATCH_BYTES = 8 * 2**20


def span(offset: int, nbytes: int, align: int) -> tuple[int, int]:
    """``(skip, room)``: reading ``nbytes`` at ``offset`` in whole ``align`` blocks reads ``room`` bytes from
    ``offset - skip``, and the bytes wanted begin ``skip`` bytes in."""
    skip = offset % align
    return skip, -(-(skip + nbytes) // align) * align


def aligned_empty(nbytes: int, align: int = DIRECT_ALIGN) -> torch.Tensor:
    """``nbytes`` of uninitialised CPU memory as uint8, starting on a multiple of ``align``."""
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    skip = -raw.data_ptr() % align
    return raw[skip : skip + nbytes]  # the view keeps ``raw`` alive


class FileReader:
    """Read-only file descriptors, opened once, and positional reads into caller buffers.

    ``io`` decides what happens to the page cache:

    - ``buffered``: plain reads; repeated reads may come from the page cache;
    - ``dontneed``: plain reads, then the pages read are dropped (``POSIX_FADV_DONTNEED``),
      so a RAM budget is really kept and a re-read really goes to the disk;
    - ``direct``: ``O_DIRECT`` reads of whole ``DIRECT_ALIGN`` blocks, from the disk straight into
      the caller's memory where its address allows, bypassing the page cache. Where the file
      system refuses ``O_DIRECT`` (tmpfs, some overlays), it falls back to ``dontneed`` and ``io``
      says so;
    - ``mmap``: reads as ``buffered``; the expert cache also computes missing experts in
      place from a mapping of the file (``MappedFiles``), on CPU.

    Two ways in: ``read_into`` fills a tensor exactly; ``read_span`` reads into a buffer with room
    for ``span``'s whole blocks (``align``), which ``direct`` fills with no other copy. Reads are
    safe from several threads at once.
    """

    def __init__(self, io: str = "buffered") -> None:
        if io not in READ_MODES:
            raise ConfigError(f"io={io!r} is not a read mode (io='auto' is chosen when a model is assembled); use one of {', '.join(READ_MODES)}")
        self.io = io
        self.align = DIRECT_ALIGN if io == "direct" else 1  # kept after a fall back, so placements stay valid
        self._fds: dict[tuple[Path, bool], int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _fd(self, path: Path, direct: bool = False) -> int:
        fd = self._fds.get((path, direct))
        if fd is None:
            with self._lock:
                fd = self._fds.get((path, direct))
                if fd is None:
                    flags = getattr(os, "O_DIRECT", 0) if direct else 0
                    fd = self._fds[(path, direct)] = open_fd(path, "checkpoint file", flags=flags)
        return fd

    def read_into(self, path: Path, offset: int, out: torch.Tensor) -> int:
        """Fill the contiguous CPU tensor ``out`` with the bytes at ``offset`` of ``path``.

        With ``direct``, the whole blocks of the range go straight into ``out`` when its address and
        ``offset`` agree modulo ``DIRECT_ALIGN``; the partial blocks at either end (or, when they
        disagree, the whole range, ``SCRATCH_BYTES`` at a time) go through a per-thread scratch buffer and are
        copied."""
        view = _bytes(out)
        if self.io == "direct":
            try:
                return self._read_direct(path, offset, view, out.data_ptr())
            except OSError as e:
                self._fall_back(path, e)
        return self._read_plain(path, offset, view)

    def read_span(self, path: Path, offset: int, nbytes: int, room: torch.Tensor) -> torch.Tensor:
        """Read ``nbytes`` at ``offset`` of ``path`` into ``room`` and return the uint8 view that holds them.

        ``room`` is a contiguous uint8 CPU tensor of at least ``span(offset, nbytes, self.align)[1]``
        bytes; the bytes land ``skip`` bytes in. With ``direct`` and ``room`` starting on a multiple of
        ``align``, one ``O_DIRECT`` read of the whole blocks fills it: no other buffer is touched."""
        skip, size = span(offset, nbytes, self.align)
        if room.numel() < size:
            raise ValueError(f"read_span needs {size} bytes of room, got {room.numel()}")
        out = room[skip : skip + nbytes]
        if self.io == "direct" and room.data_ptr() % self.align == 0:
            try:
                done = self._read_blocks(path, offset - skip, [_bytes(room)[:size]])
                self._check_end(path, offset, nbytes, offset - skip + done)
                return out
            except OSError as e:
                self._fall_back(path, e)
        self.read_into(path, offset, out)
        return out

    def _fall_back(self, path: Path, e: OSError) -> None:
        if e.errno not in REFUSED_FLAGS:
            raise CheckpointError(f"checkpoint file {path} cannot be read: {e.strerror or e}") from None
        self.io = "dontneed"  # this file system refuses O_DIRECT

    def _read_plain(self, path: Path, offset: int, view: memoryview) -> int:
        fd = self._fd(path)
        n = self._read_exact(fd, path, offset, view)
        if self.io == "dontneed" and n:
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
        return n

    def _read_exact(self, fd: int, path: Path, offset: int, view: memoryview) -> int:
        want, done = len(view), 0
        while done < want:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(f"checkpoint file {path} cannot be read at byte {offset + done}: "
                                      f"{e.strerror or e}") from None
            if n == 0:
                raise CheckpointError(
                    f"{path} ended after {offset + done} bytes while reading {want} bytes at offset {offset}; "
                    "the file is truncated, re-download it"
                )
            done += n
        return want

    def _read_direct(self, path: Path, offset: int, view: memoryview, address: int) -> int:
        """``O_DIRECT`` into ``view`` (at ``address``): its aligned middle in place, the rest through scratch."""
        a, n = self.align, len(view)
        start, size = offset - offset % a, span(offset, n, a)[1]
        head = -offset % a  # bytes of ``view`` before the first block boundary of the file
        middle = (offset + n) // a * a - offset - head  # whole blocks that can land in place
        if (address - offset) % a or middle <= 0:
            self._read_through_scratch(path, start, size, offset, view)
            return n
        tail = n - head - middle
        scratch = self._scratch(2 * a) if head or tail else None  # a range of whole blocks needs none
        bufs = ([scratch[:a]] if head else []) + [view[head : head + middle]] + ([scratch[a : 2 * a]] if tail else [])
        done = self._read_blocks(path, start, bufs)  # a head block, if any, is the one before the middle
        self._check_end(path, offset, n, start + done)
        if head:
            view[:head] = scratch[a - head : a]
        if tail:
            view[n - tail :] = scratch[a : a + tail]
        return n

    def _read_through_scratch(self, path: Path, start: int, size: int, offset: int, view: memoryview) -> None:
        """``O_DIRECT`` reads of the ``size`` bytes of whole blocks from ``start`` into this thread's scratch, at
        most ``SCRATCH_BYTES`` at a time, each copied on to the part of ``view`` (the bytes at ``offset``) it holds."""
        step = min(size, max(SCRATCH_BYTES // self.align, 1) * self.align)
        scratch, pos, end = self._scratch(step), start, offset + len(view)
        while pos < end:
            want = min(step, start + size - pos)
            got = self._read_blocks(path, pos, [scratch[:want]])
            lo, hi = max(pos, offset), min(pos + got, end)
            if hi > lo:
                view[lo - offset : hi - offset] = scratch[lo - pos : hi - pos]
            pos += got
            if got < want:  # the end of the file
                break
        self._check_end(path, offset, len(view), pos)

    def _read_blocks(self, path: Path, start: int, bufs: list[memoryview]) -> int:
        """``O_DIRECT`` reads of ``bufs`` laid end to end from ``start``, up to the end of the file; bytes read."""
        fd, want, done = self._fd(path, direct=True), sum(len(b) for b in bufs), 0
        while done < want:
            n = os.preadv(fd, _after(bufs, done), start + done)
            if n == 0:  # end of file: the last block is short
                break
            done += n
        return done

    def _check_end(self, path: Path, offset: int, nbytes: int, end: int) -> None:
        if end < offset + nbytes:
            raise CheckpointError(
                f"{path} ended after {end} bytes while reading {nbytes} bytes at offset {offset}; "
                "the file is truncated, re-download it"
            )

    def _scratch(self, nbytes: int) -> memoryview:
        """A ``DIRECT_ALIGN``-aligned buffer of at least ``nbytes``, one per thread, grown as needed."""
        buf = getattr(self._local, "scratch", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.scratch = _bytes(aligned_empty(nbytes))
        return buf

    def read_tensor(self, info: TensorInfo, *, keep_cached: bool = True) -> torch.Tensor:
        """A fresh CPU tensor holding ``info``'s data. ``keep_cached=False`` (a tensor read once into memory of its
        own: the dense weights) drops the pages a ``buffered`` or ``mmap`` read brought into the page cache, where
        they would be a second copy, charged to the process's memory cgroup and taking room from the experts."""
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            self.read_into(info.file, info.offset, out)
            if not keep_cached and self.io in ("buffered", "mmap") and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _after(bufs: list[memoryview], skip: int) -> list[memoryview]:
    """``bufs`` less their first ``skip`` bytes (a read that stopped short goes on from there)."""
    out = []
    for b in bufs:
        if skip >= len(b):
            skip -= len(b)
            continue
        out.append(b[skip:])
        skip = 0
    return out


class MappedFiles:
    """Private, read-only-in-effect mappings of checkpoint files, each kept while the file stays the same.

    ``tensor`` views bytes of a file without copying them: the kernel reads the pages on
    first touch and keeps them in its page cache, which it may reclaim. The mapping is
    copy-on-write (``MAP_PRIVATE``), so even a stray in-place write stays in this process.
    ``willneed`` asks the kernel to start reading a range now, without waiting for it.

    A file that changes on disk (another size, inode, device or modification time: truncated,
    rewritten, replaced) is mapped afresh on its next use, and a range past its end is refused
    with a ``CheckpointError`` rather than touched: a page of a mapping past the end of its file
    kills the process with SIGBUS. ``current(path)`` is that check (one ``stat``); callers that
    keep views check it before each use. A file shortened between that check and the compute that
    follows can still fault: the check narrows the window, it cannot close it.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, _Mapping] = {}
        self._lock = threading.Lock()
        self._closed = False

    def current(self, path: Path) -> "_Mapping":
        """The mapping of ``path`` as the file is now: the one made before if the file is unchanged, else a new one."""
        stamp = _stamp(path)
        with self._lock:
            if self._closed:
                raise ModelClosedError(f"the mappings of {path} were closed (model.offload.close()); load the model again")
            mapping = self._maps.get(path)
            if mapping is None or mapping.stamp != stamp:
                # the old mapping is only dropped here: tensors that still view it keep it mapped until they go
                mapping = self._maps[path] = _map_file(path)
            return mapping

    def tensor(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A ``shape`` tensor of ``dtype`` viewing the bytes at ``offset`` of ``path`` as it is now (no copy)."""
        return self.current(path).tensor(offset, dtype, shape)

    def willneed(self, path: Path, offset: int, nbytes: int) -> None:
        """Start reading ``nbytes`` at ``offset`` of ``path`` into the page cache in the background.

        Advice only: a file not mapped yet, or shorter than the range, is left alone."""
        with self._lock:
            mapping = self._maps.get(path)
        if mapping is None or offset + nbytes > len(mapping.mmap):
            return
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        if hasattr(mapping.mmap, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            try:
                mapping.mmap.madvise(mmap.MADV_WILLNEED, start, offset + nbytes - start)
            except (OSError, ValueError):
                pass  # advice only: the pages are read on first touch anyway

    def close(self) -> None:
        """Drop the mappings, for good: a later use raises ``ModelClosedError``. Each is unmapped once no
        tensor views it any more (closing it while a view lives would leave that view pointing at unmapped memory)."""
        with self._lock:
            self._closed = True
            self._maps.clear()


@dataclass(frozen=True, eq=False)
class _Mapping:
    """One mapping of a file, with the ``stat`` stamp of the file it was made from."""

    path: Path
    stamp: tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns)
    mmap: mmap.mmap
    data: torch.Tensor  # the whole mapping as uint8

    def tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A ``shape`` tensor of ``dtype`` viewing the bytes at ``offset`` (no copy), once they are known to be
        inside both the mapping and the file; else a ``CheckpointError`` that names the file."""
        itemsize = dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        if offset % itemsize:
            raise CheckpointError(
                f"{self.path}: the tensor at byte {offset} is not aligned to its {itemsize}-byte dtype, so it cannot "
                "be mapped; use io='direct' or 'buffered' for this checkpoint"
            )
        size = min(self.stamp[2], len(self.mmap))
        if offset + nbytes > size:
            raise CheckpointError(
                f"{self.path} is {size} bytes long, but the tensor at byte {offset} needs {nbytes} bytes from there: "
                "the file was truncated or replaced since the model was loaded; restore it (or re-download it)"
            )
        return self.data[offset : offset + nbytes].view(dtype).view(shape)


def _stamp(path: Path) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise _gone(path, e) from None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _gone(path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(
        f"{path} cannot be opened any more ({e.strerror or e}): it was removed, replaced or made unreadable since the "
        "model was loaded; restore it"
    )


def _map_file(path: Path) -> _Mapping:
    """Map ``path`` whole; the stamp is the one of the file descriptor that was mapped. Only a refused
    mapping raises ``OSError`` (the caller then reads into slots instead)."""
    with open_regular(path, "checkpoint file") as f:  # a FIFO put in its place must not hang the open
        st = os.fstat(f.fileno())
        if not st.st_size:
            raise CheckpointError(f"{path} is empty: it was truncated since the model was loaded; restore it")
        mapped = _private_map(f.fileno())
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return _Mapping(path, stamp, mapped, torch.frombuffer(mapped, dtype=torch.uint8))


# Linux's MAP_NORESERVE, which Python's mmap module does not name: a private mapping is otherwise
# charged in full against the commit limit, and one shard larger than RAM + swap fails to map.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def _private_map(fd: int) -> mmap.mmap:
    """A copy-on-write mapping of the whole file: writes to it never reach the file."""
    if os.name != "posix":
        return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
