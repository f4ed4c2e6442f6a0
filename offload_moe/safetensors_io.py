"""Read safetensors headers and byte ranges ourselves: validated and read-only.

Reading with ``os.preadv`` into a caller's buffer lets an expert land directly in
its slot (or a reused staging buffer) with one copy, keeps the process's resident
memory at what it asked for, and releases the GIL while the disk works.

``MappedFiles`` is the other way in, for ``io="mmap"`` on CPU: tensors that view a
private (copy-on-write) mapping of the file, so compute reads the page cache in place
and nothing written to them can reach the file.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, ModelClosedError, ModelPathError

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

MAX_HEADER_BYTES = 100 * 2**20


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
    """Parse and validate a safetensors file's header; every offset is checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: it is only {size} bytes long")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path} has a corrupted safetensors header (length field says {n} bytes, file has {size}); "
                    "re-download or re-save this file"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; re-download the model") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupted safetensors header ({e}); re-download or re-save this file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupted safetensors header (not a JSON object)")
    data_start = 8 + n
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, meta, data_start, size)
    return tensors


def _tensor_info(path: Path, name: str, meta: object, data_start: int, size: int) -> TensorInfo:
    try:
        dtype_name, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {meta!r}") from None
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name}, which offload_moe cannot read")
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if end - begin != expected or begin < 0:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans bytes {begin}..{end} but its shape {list(shape)} and dtype {dtype_name} "
            f"need {expected}; the file is corrupted"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes; "
            "re-download this shard"
        )
    return TensorInfo(name, path, data_start + begin, end - begin, dtype, shape)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: from ``model.safetensors.index.json`` if present, else ``*.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}); re-download it") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointError(
                f"{folder}: shard(s) {', '.join(missing)} named in {index.name} are missing; "
                "download the complete checkpoint"
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelPathError(
            f"{folder} has no .safetensors files; offload_moe reads safetensors checkpoints "
            "(convert .bin weights with transformers' save_pretrained)"
        )
    return files


IO_MODES = ("buffered", "dontneed", "direct", "mmap")
PAGE = 4096


class FileReader:
    """Read-only file descriptors, opened once, and positional reads into caller buffers.

    ``io`` decides what happens to the page cache:

    - ``buffered``: plain reads; repeated reads may come from the page cache;
    - ``dontneed``: plain reads, then the pages read are dropped (``POSIX_FADV_DONTNEED``),
      so a RAM budget is really kept and a re-read really goes to the disk;
    - ``direct``: ``O_DIRECT`` reads of page-aligned spans into an aligned scratch buffer,
      bypassing the page cache. Where the file system refuses ``O_DIRECT`` (tmpfs, some
      overlays), it falls back to ``dontneed`` and ``io`` says so;
    - ``mmap``: reads as ``buffered``; the expert cache also computes missing experts in
      place from a mapping of the file (``MappedFiles``), on CPU.

    Reads are safe from several threads at once.
    """

    def __init__(self, io: str = "buffered") -> None:
        if io not in IO_MODES:
            from .errors import ConfigError

            raise ConfigError(f"io={io!r} is not an I/O mode; use one of {', '.join(IO_MODES)}")
        self.io = io
        self._fds: dict[tuple[Path, bool], int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _fd(self, path: Path, direct: bool = False) -> int:
        fd = self._fds.get((path, direct))
        if fd is None:
            with self._lock:
                fd = self._fds.get((path, direct))
                if fd is None:
                    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (getattr(os, "O_DIRECT", 0) if direct else 0)
                    fd = os.open(path, flags)
                    self._fds[(path, direct)] = fd
        return fd

    def read_into(self, path: Path, offset: int, out: torch.Tensor) -> int:
        """Fill the contiguous CPU tensor ``out`` with the bytes at ``offset`` of ``path``."""
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if self.io == "direct":
            try:
                return self._read_direct(path, offset, view)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)):
                    raise
                self.io = "dontneed"  # this file system refuses O_DIRECT
        n = self._read_exact(self._fd(path), path, offset, view)
        if self.io == "dontneed" and n:
            os.posix_fadvise(self._fd(path), offset, n, os.POSIX_FADV_DONTNEED)
        return n

    def _read_exact(self, fd: int, path: Path, offset: int, view: memoryview) -> int:
        want, done = len(view), 0
        while done < want:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{path} ended after {offset + done} bytes while reading {want} bytes at offset {offset}; "
                    "the file is truncated, re-download it"
                )
            done += n
        return want

    def _read_direct(self, path: Path, offset: int, view: memoryview) -> int:
        start = offset // PAGE * PAGE
        end = -(-(offset + len(view)) // PAGE) * PAGE
        scratch = self._scratch(end - start)
        fd = self._fd(path, direct=True)
        done = 0
        while done < end - start:
            n = os.preadv(fd, [scratch[done : end - start]], start + done)
            if n == 0:  # end of file: the last page is short
                break
            done += n
        if done < offset - start + len(view):
            raise CheckpointError(
                f"{path} ended after {start + done} bytes while reading {len(view)} bytes at offset {offset}; "
                "the file is truncated, re-download it"
            )
        view[:] = scratch[offset - start : offset - start + len(view)]
        return len(view)

    def _scratch(self, nbytes: int) -> memoryview:
        """A page-aligned buffer of at least ``nbytes``, one per thread, grown as needed."""
        buf = getattr(self._local, "scratch", None)
        if buf is None or len(buf) < nbytes:
            raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
            skip = -raw.data_ptr() % PAGE
            self._local.raw = raw  # keeps the memory alive
            buf = self._local.scratch = memoryview(raw[skip : skip + nbytes].numpy())
        return buf

    def read_tensor(self, info: TensorInfo) -> torch.Tensor:
        """A fresh CPU tensor holding ``info``'s data."""
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            self.read_into(info.file, info.offset, out)
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()


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
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = itemsize
        for d in shape:
            nbytes *= d
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
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _gone(path, e) from None
    with f:
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
