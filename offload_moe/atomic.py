"""Writing files atomically: a temporary file in the same folder, flushed to disk, then renamed.

Readers see the old file or the new one, never half of one, and an interrupted write
leaves no temporary file behind. Every file offload_moe writes goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError


def atomic_write(path: str | Path, content: bytes | Callable[[BinaryIO], None], mode: int = 0o644) -> Path:
    """Write ``content`` (bytes, or a function writing into the open file) to ``path`` atomically.

    Raises ``OutputError`` naming the path when the folder cannot be made or written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e} ({path.parent}); "
                          "choose a folder you can write to") from e
    try:
        with os.fdopen(fd, "wb") as f:
            content(f) if callable(content) else f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}; choose a folder you can write to") from e
        raise
    return path


@contextmanager
def output_folder(path: str | Path) -> Iterator[Path]:
    """Make the folder ``path`` if needed and check that files can be made in it, before long work is done
    in the ``with`` block. If the block fails, the folders made here are removed again while still empty."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        _remove_empty(made)
        raise OutputError(f"cannot write into {path}: {e.strerror or e}; choose a folder you can write to") from e
    try:
        yield path
    except BaseException:
        _remove_empty(made)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something was written), or already gone
            return
