"""Writing files atomically: a temporary file in the same folder, flushed to disk, then renamed.

Readers see the old file or the new one, never half of one. A write that fails removes its
temporary file. A process killed while writing cannot remove it, so temporary files are named
after the writing process, ``.NAME.offload-moe-PID-XXXX.tmp``, and the next write to the same
target removes those whose process no longer runs (never one of a writer still at work); a folder
so named (quantize_experts' work folder) goes the same way, with what it holds.
Every file offload_moe writes goes through here.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError

Content = bytes | Callable[[BinaryIO], None]
_TEMP_TAG = "offload-moe"


def atomic_write(path: str | Path, content: Content, mode: int = 0o644) -> Path:
    """Write ``content`` (bytes, or a function writing into the open file) to ``path`` atomically.

    Raises ``OutputError`` naming the path when the folder cannot be made or written.
    """
    return atomic_write_all({path: content}, mode)[0]


def atomic_write_all(files: Mapping[str | Path, Content], mode: int = 0o644) -> list[Path]:
    """Write several files as one set: every file is written to a temporary file first, and only when all
    of them are on disk are they renamed into place. If any write fails (a full disk), none of the targets
    changes, no temporary file stays and no folder made here is left; the renames that follow need no
    space. Returns the paths, in order.
    """
    staged: list[tuple[Path, Path]] = []  # (temporary file, target)
    made: list[Path] = []  # folders made here, deepest first
    try:
        for path, content in files.items():
            path = Path(path)
            made += _make_folder(path.parent, path)
            staged.append((_stage(path, content, mode), path))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        _remove_empty(made)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}; choose a folder you can write to") from e
        raise
    return [path for _, path in staged]


def _stage(path: Path, content: Content, mode: int) -> Path:
    """``content`` in a new temporary file beside ``path``, flushed to disk; removed again if writing fails."""
    try:
        remove_stale_temporaries(path)
        tmp = path.parent / f".{path.name}.{_TEMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e} ({path.parent}); "
                          "choose a folder you can write to") from e
    try:
        with os.fdopen(fd, "wb") as f:
            content(f) if callable(content) else f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _make_folder(folder: Path, target: Path | None = None) -> list[Path]:
    """Make ``folder`` and its missing parents; returns those made, deepest first. For ``target`` (a file to be
    written there) that is all; without one, a file must also be creatable in the folder (``output_folder``).
    On failure the folders made are removed again and an OutputError names ``target``, else the folder."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if target is None:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        _remove_empty(made)
        what = f"{target}: {e.strerror or e} ({folder})" if target is not None else f"into {folder}: {e.strerror or e}"
        raise OutputError(f"cannot write {what}; choose a folder you can write to") from e
    return made


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files (or folders, with their contents) that writers of ``path`` killed mid-write
    left behind; returns them.

    A temporary whose writing process still runs is kept: it may be a concurrent write.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_TEMP_TAG}-(\d{{1,10}})-[0-9a-f]+\.tmp")
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.{_TEMP_TAG}-*.tmp"):
        match = pattern.fullmatch(candidate.name)
        if match and not _process_runs(int(match.group(1))):
            try:
                if candidate.is_dir() and not candidate.is_symlink():
                    shutil.rmtree(candidate)
                else:
                    candidate.unlink()
            except OSError:  # removed by another writer first, or not ours to remove (a sticky folder)
                continue
            removed.append(candidate)
    return removed


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (permission denied), or a PID we cannot ask about
        return True
    return True


@contextmanager
def output_folder(path: str | Path) -> Iterator[Path]:
    """Make the folder ``path`` if needed and check that files can be made in it, before long work is done
    in the ``with`` block. If the block fails, the folders made here are removed again while still empty."""
    path = Path(path)
    made = _make_folder(path)
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
            continue
