"""A fault-injection harness for expert reads: I/O errors, short reads, hangs, out-of-memory.

It replaces ``os.preadv`` as ``offload_moe.safetensors_io`` sees it, so every read the
runtime makes (foreground or background prefetch, buffered or direct) meets the fault,
through the real code paths. Dense weights are loaded before a test arms it.
"""

from __future__ import annotations

import errno
import os
import threading

import torch

from offload_moe import safetensors_io, transfer


class _Os:
    """``os`` with ``preadv`` routed through the harness."""

    def __init__(self, faults: "Faults"):
        self._faults = faults

    def __getattr__(self, name):
        return getattr(os, name)

    def preadv(self, fd, buffers, offset):
        return self._faults.preadv(fd, buffers, offset)


class Faults:
    """Arm with ``mode``: ``eio``, ``short``, ``hang`` or ``oom`` (raised by the host-to-device copy)."""

    def __init__(self, monkeypatch):
        self.mode: str | None = None
        self.reads = 0  # reads that met an armed fault
        self.release = threading.Event()  # ends every hang
        self._local = threading.local()
        monkeypatch.setattr(safetensors_io, "os", _Os(self))
        real_copy = transfer.Mover._copy

        def copy(mover, host_flat, device_flat, compute=None):
            if self.mode == "oom":
                self.reads += 1
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real_copy(mover, host_flat, device_flat, compute)

        monkeypatch.setattr(transfer.Mover, "_copy", copy)

    def arm(self, mode: str) -> None:
        self.mode, self.reads = mode, 0
        self.release.clear()

    def clear(self) -> None:
        self.mode = None
        self.release.set()

    def preadv(self, fd, buffers, offset):
        if getattr(self._local, "eof_next", False):  # the rest of a short read: the file "ends" here
            self._local.eof_next = False
            return 0
        mode = self.mode
        if mode in (None, "oom"):
            return os.preadv(fd, buffers, offset)
        self.reads += 1
        if mode == "eio":
            raise OSError(errno.EIO, "Input/output error (injected)")
        if mode == "short":  # the file seems to end a little way into the read
            view = buffers[0]
            self._local.eof_next = True  # per thread: a read in flight while the fault clears still ends short
            return os.preadv(fd, [view[: max(1, len(view) // 3)]], offset)
        if mode == "hang":
            self.release.wait()
            return os.preadv(fd, buffers, offset)
        raise ValueError(mode)
