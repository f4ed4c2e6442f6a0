"""Reading files from a model folder, a profile or a trace: untrusted data, read defensively.

Every small file offload_moe reads (``config.json``, indexes, manifests, profiles, trace
metadata) comes through here, so the same rules hold everywhere:

- only regular files are opened: a FIFO, a device or a folder is refused before ``open``
  could block or read without end;
- a small file is read with a size cap;
- every failure (missing, permission denied, not UTF-8, not JSON, duplicate keys, nesting
  too deep) is an ``OffloadMoEError`` subclass whose message names the file;
- a name read from a file (a shard in an index, a file in a manifest) is resolved inside
  its folder and refused if it would lead out of it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import CheckpointError, OffloadMoEError

SMALL_FILE_LIMIT = 64 * 2**20  # indexes of the largest checkpoints are a few MB
REFUSED_FLAGS = (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP))  # O_DIRECT refused


def open_fd(path: Path, what: str = "file", error: type[OffloadMoEError] = CheckpointError, *, flags: int = 0) -> int:
    """A blocking read-only descriptor of ``path``, refusing anything that is not a regular file.

    The file is opened non-blocking, so a FIFO cannot hang the open, and checked with ``fstat``
    on the open descriptor, so it cannot be swapped between the check and the read. ``flags`` are
    added to the open (``os.O_DIRECT``); an open refused for them (``EINVAL``: the file system
    does not do ``O_DIRECT``) stays an ``OSError``, for the caller to open again without them.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0) | flags)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except PermissionError:
        raise error(f"{what} {path} cannot be read: permission denied; make it readable (chmod +r)") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file") from None
    except OSError as e:
        if flags and e.errno in REFUSED_FLAGS:
            raise
        raise error(f"{what} {path} cannot be opened: {e.strerror or e}") from None
    except ValueError:  # a NUL byte in the name
        raise error(f"{what} {str(path)!r} is not a file name (it holds a NUL byte)") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
            raise error(f"{what} {path} is {kind}; offload_moe reads only regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: Path, what: str = "file", error: type[OffloadMoEError] = CheckpointError) -> BinaryIO:
    """Open ``path`` for reading in binary, refusing anything that is not a regular file (see ``open_fd``)."""
    fd = open_fd(path, what, error)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, what: str = "file", error: type[OffloadMoEError] = CheckpointError,
               limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The whole of a small regular file, refusing one larger than ``limit`` bytes."""
    with open_regular(path, what, error) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {limit:,} bytes, more than such a file holds; "
                    "it is not the file offload_moe expects")
    return data


def read_text(path: Path, what: str = "file", error: type[OffloadMoEError] = CheckpointError,
              limit: int = SMALL_FILE_LIMIT) -> str:
    """A small regular file decoded as UTF-8."""
    data = read_bytes(path, what, error, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start}); it is corrupted or not the file expected") from None


def parse_json(text: str | bytes, where: str, error: type[OffloadMoEError] = CheckpointError, *,
               parse_int: Callable[[str], object] | None = None) -> object:
    """Parse JSON as strictly as the safetensors library does: no duplicate keys, no NaN or
    Infinity; nesting deeper than Python recurses is an error too. ``where`` names the file in errors.
    ``parse_int`` (as ``json.loads`` takes it) sees each integer's text, for a reader stricter still."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where} is not UTF-8 (byte {e.start}); it is corrupted") from None
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{where} has the key {key!r} twice; it is corrupted")
            out[key] = value
        return out

    def no_constant(name: str) -> object:
        raise error(f"{where} holds {name}, which is not JSON; it is corrupted")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant, parse_int=parse_int)
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON ({e}); it is corrupted") from None
    except RecursionError:
        raise error(f"{where} nests JSON too deeply to be a header or a config; it is corrupted") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise error(f"{where} cannot be parsed ({e}); it is corrupted") from None


def read_json(path: Path, what: str = "file", error: type[OffloadMoEError] = CheckpointError,
              limit: int = SMALL_FILE_LIMIT) -> object:
    """A small regular JSON file, parsed strictly (see ``parse_json``)."""
    return parse_json(read_text(path, what, error, limit), f"{what} {path}", error)


def inside(folder: Path, name: object, where: str, error: type[OffloadMoEError] = CheckpointError) -> Path:
    """``folder / name`` for a file name read from ``where``; refused unless it stays inside ``folder``.

    The name is judged, not where a link leads: a symlinked shard (as the Hugging Face cache
    keeps them) is allowed, while an absolute name, a ``..`` step or a NUL byte is not.
    """
    if not isinstance(name, str) or not name:
        raise error(f"{where} names a file as {name!r}; file names are non-empty strings")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if "\x00" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise error(f"{where} names the file {name!r}, which lies outside {folder}; "
                    "a model folder may only name files inside itself")
    return folder / name
