"""Writing files atomically: a temporary file in the same folder, flushed to disk, then renamed.

Readers see the old file or the new one, never half of one, and an interrupted write
leaves no temporary file behind. Every file offload_moe writes goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, content: bytes | Callable[[BinaryIO], None], mode: int = 0o644) -> Path:
    """Write ``content`` (bytes, or a function writing into the open file) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            content(f) if callable(content) else f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
