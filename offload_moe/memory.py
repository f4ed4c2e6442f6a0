"""The memory this process may use, and ``io="auto"``'s choice of a read mode from it.

``io="mmap"`` computes missing experts from the mapped checkpoint, with the kernel's page cache as the warm
tier: fast while the experts stay in the page cache, and a cliff when they do not (the kernel evicts the pages
it just read, every step). ``io="direct"`` reads missing experts into slots, whose hot set the cache's own
policy keeps, and uses no page cache. So ``choose_io`` picks ``mmap`` where the checkpoint's experts fit in
the memory this process may use beside the dense weights, or where that memory holds well over what the slots
hold (the page cache then keeps more experts than the slots could), and ``direct`` elsewhere (BENCHMARKS.md,
"io=auto under memory limits").

The memory the process may use (``memory_room``) is the least of what the kernel calls available
(MemAvailable, which counts the page cache it can drop) and, for each memory cgroup the process is in and
each of their ancestors, its limit less what it uses, plus the file pages it holds (the kernel drops those
first). The cgroups are found as the kernel lists them (``/proc/self/cgroup``, ``/proc/self/mountinfo``),
cgroup v1 (``memory.limit_in_bytes``) and v2 (``memory.max``) alike.

``malloc_held`` and ``AllocationPeak`` count what this process allocates (glibc's malloc, every thread), for the
tests and benchmarks that hold the runtime to dense weights + budget + 10% of the checkpoint (issue 17) without
reading RSS.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .values import format_bytes

UNLIMITED = 2**60  # a limit above this is "no limit" (v1 writes 9223372036854771712, v2 "max")
MARGIN = 0.10  # of the room, kept free beside the experts: the KV cache, activations, other programs' growth
MIN_MARGIN = 64 * 2**20
# io="auto" maps experts that do not fit where the page cache can hold this many times the slots' bytes: a miss from
# the mapping (page faults, read-ahead) cost about 1.5x a direct read into a slot where each held as many experts
# (BENCHMARKS.md, "io=auto under memory limits": direct won at 1.2x, mmap at 2.1x and above)
MAPPED_OVER_SLOTS = 1.5


@dataclass(frozen=True)
class CgroupLimit:
    """A memory cgroup's limit, and what it uses, in bytes."""

    folder: Path
    version: int  # 1 or 2
    limit: int
    usage: int
    file_pages: int  # page cache charged to it, which the kernel reclaims before anything else

    @property
    def free(self) -> int:
        """What the cgroup may still take: its limit less what it uses that the kernel cannot simply drop."""
        return max(0, self.limit - max(0, self.usage - self.file_pages))

    @property
    def setting(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes"


@dataclass(frozen=True)
class MemoryRoom:
    """The bytes this process may still take (``available``) and what bounds them, in words (``bound``)."""

    available: int
    bound: str


def memory_room(proc: Path = Path("/proc/self"), available: int | None = None) -> MemoryRoom:
    """The memory this process may still use: the least of ``available`` (default: MemAvailable, as psutil reads
    it) and the room under the tightest memory cgroup limit it is in (``cgroup_limit``)."""
    available = psutil.virtual_memory().available if available is None else available
    cgroup = cgroup_limit(proc)
    if cgroup is not None and cgroup.free < available:
        return MemoryRoom(cgroup.free, f"cgroup {cgroup.setting} {format_bytes(cgroup.limit)}")
    return MemoryRoom(available, "MemAvailable")


def cgroup_limit(proc: Path = Path("/proc/self")) -> CgroupLimit | None:
    """The memory cgroup limit that leaves this process the least room, among the cgroups it is in
    (``memory_cgroups``) and their ancestors up to the mount point; None where there is none (no limit, no
    cgroup file system, not Linux)."""
    found = []
    for version, folder, mount_point in memory_cgroups(proc):
        while True:
            limit = _limit(folder, version)
            if limit is not None:
                found.append(limit)
            if folder == mount_point or mount_point not in folder.parents:
                break
            folder = folder.parent
    return min(found, key=lambda c: c.free, default=None)


def memory_cgroups(proc: Path = Path("/proc/self")) -> list[tuple[int, Path, Path]]:
    """(version, folder, mount point) of each cgroup with memory in it that ``proc/cgroup`` lists (v1's memory
    controller, then v2), found under its mount in ``proc/mountinfo``; [] where there is none."""
    mounts = _cgroup_mounts(_read(proc / "mountinfo") or "")
    out = []
    for version, path in sorted(_memory_cgroups(_read(proc / "cgroup") or "")):
        if version not in mounts:
            continue
        root, mount_point = mounts[version]
        if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
            path = path[len(root.rstrip("/")):]  # the part of the hierarchy mounted (a container's own)
        out.append((version, mount_point / path.lstrip("/"), mount_point))
    return out


def _limit(folder: Path, version: int) -> CgroupLimit | None:
    names = ("memory.max", "memory.current", "file") if version == 2 else \
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")
    limit, usage = _number(folder / names[0]), _number(folder / names[1])
    if limit is None or limit >= UNLIMITED or usage is None:
        return None
    stat = _stat(_read(folder / "memory.stat") or "")
    file_pages = stat.get(names[2], stat.get("cache", 0))
    return CgroupLimit(folder, version, limit, usage, file_pages)


def _memory_cgroups(text: str) -> list[tuple[int, str]]:
    """(version, path) of each cgroup ``/proc/self/cgroup`` lists that has memory in it: v1's memory controller
    ("4:memory:/a/b") and the v2 hierarchy ("0::/a/b")."""
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and controllers == "":
            out.append((2, path))
        elif "memory" in controllers.split(","):
            out.append((1, path))
    return out


def _cgroup_mounts(text: str) -> dict[int, tuple[str, Path]]:
    """{version: (the hierarchy's root that is mounted, the mount point)} from ``/proc/self/mountinfo``: the
    cgroup v1 mount with the memory controller, and the cgroup2 mount."""
    out: dict[int, tuple[str, Path]] = {}
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) < 3:
            continue
        fstype, options = after[0], after[2].split(",")
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fstype == "cgroup2":
            out.setdefault(2, (root, point))
        elif fstype == "cgroup" and "memory" in options:
            out.setdefault(1, (root, point))
    return out


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as an octal escape (``\\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _stat(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _number(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return UNLIMITED
    return int(text) if text.isdigit() else None


def _read(path: Path) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return None


@dataclass(frozen=True)
class IoChoice:
    """The read mode a model runs with, and why (``reason``: for ``plan``, ``stats()`` and the load's log)."""

    io: str
    reason: str


def choose_io(io: str, *, device: torch.device, experts_bytes: int, slots_bytes: int, dense_bytes: int,
              host_tier: bool, room: MemoryRoom | None = None) -> IoChoice:
    """The read mode for ``io`` (a mode, or ``"auto"``): a mode given is kept. ``auto`` is ``direct`` on a GPU
    (``mmap`` is CPU only), where the slots (``slots_bytes``) hold every expert (each is read once; the page
    cache would hold a second copy), and beside a host tier (it keeps the hot set). Else, with ``room`` (default
    ``memory_room()``) less the dense weights and a margin (``MARGIN`` of the room, at least ``MIN_MARGIN``):
    ``mmap`` while all the experts (``experts_bytes``) fit in it, and where they do not but it holds at least
    ``MAPPED_OVER_SLOTS`` times the slots (the page cache then keeps more of the experts than the slots would);
    ``direct`` where the slots fit and it holds less; ``mmap`` again where not even the slots fit, as the page
    cache gives way where filled slots cannot."""
    if io != "auto":
        return IoChoice(io, "as asked")
    if device.type != "cpu":
        return IoChoice("direct", f"auto: io=mmap is for the CPU only; on {device.type} experts are read into slots")
    if slots_bytes >= experts_bytes:
        return IoChoice("direct", "auto: the slots hold every expert, so each is read into its slot once")
    if host_tier:
        return IoChoice("direct", "auto: the host tier keeps the hot experts in RAM; io=mmap takes none")
    room = memory_room() if room is None else room
    spare = room.available - dense_bytes - max(MIN_MARGIN, int(MARGIN * room.available))
    where = (f"the {format_bytes(max(spare, 0))} this process may use ({room.bound}: {format_bytes(room.available)}, "
             f"less {format_bytes(dense_bytes)} of dense weights and a margin)")
    experts = f"the experts, {format_bytes(experts_bytes)},"
    if experts_bytes <= spare:
        return IoChoice("mmap", f"auto: {experts} fit in {where}")
    if slots_bytes <= spare:
        if spare >= MAPPED_OVER_SLOTS * slots_bytes:
            return IoChoice("mmap", f"auto: {experts} exceed {where}, but the page cache there holds "
                                    f"{spare / slots_bytes:.1f}x the slots, {format_bytes(slots_bytes)} (mmap from "
                                    f"{MAPPED_OVER_SLOTS}x)")
        return IoChoice("direct", f"auto: {experts} exceed {where}, which holds little more than the slots, "
                                  f"{format_bytes(slots_bytes)}; the slots keep the hot ones")
    return IoChoice("mmap", f"auto: neither {experts} nor the slots, {format_bytes(slots_bytes)}, fit in {where}; "
                            "the page cache gives way where full slots would not (lower the budget for speed)")


def malloc_held() -> int | None:
    """The bytes malloc has handed out on every thread and not had back (glibc's ``mallinfo2``: ``uordblks`` in
    its arenas plus ``hblkhd`` in chunks of their own), now; None off glibc. Torch's CPU tensors come from malloc,
    so this is what the runtime allocates, without the page cache, mapped files and freed-but-kept memory that make
    RSS noisy. For tests that hold a memory bound."""
    libc = _glibc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class AllocationPeak:
    """The peak of the bytes this process holds in large allocations (``threshold`` bytes or more: tensors,
    buffers) while the block runs, on every thread, however briefly: for benchmarks in a fresh process.

    On entry it has malloc serve every allocation of ``threshold`` bytes or more with a mapping of its own
    (``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc raising that threshold by itself), so each one is
    counted when it is made and uncounted when it is freed; ``peak`` is then the highest count (malloc's own
    "max mmap bytes") less the count on entry. Mapped files (``io="mmap"``) are not allocations and are not
    counted. The setting stays for the rest of the process (malloc cannot be told to go back to raising the
    threshold) and changes how freed memory is kept, so measure RSS in another process; and malloc's maximum is
    process-wide and never reset, so nothing before the block may have held more than the block will.
    ``supported`` is False off glibc (``peak`` is then None).
    """

    M_MMAP_THRESHOLD = -3  # mallopt's parameter number, <malloc.h>

    def __init__(self, threshold: int = 64 * 2**10):
        self.threshold = threshold
        self.peak: int | None = None
        self._libc = _glibc()
        self._start = 0

    @property
    def supported(self) -> bool:
        return self._libc is not None

    def __enter__(self) -> "AllocationPeak":
        if self._libc is not None:
            self._libc.mallopt(self.M_MMAP_THRESHOLD, self.threshold)
            self._start = self._libc.mallinfo2().hblkhd
        return self

    def __exit__(self, *exc) -> None:
        self.peak = self.so_far()

    def so_far(self) -> int | None:
        """The peak since entry, so far."""
        if self._libc is None:
            return None
        for line in _malloc_stats(self._libc).splitlines():
            if line.startswith("max mmap bytes"):
                return int(line.split("=")[1]) - self._start
        raise RuntimeError("glibc's malloc_stats printed no 'max mmap bytes' line")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _glibc():
    """This process's glibc, with ``mallopt``, ``mallinfo2`` (2.33 and later) and ``malloc_stats`` typed; None
    elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_stats  # noqa: B018 (present?)
    except (OSError, AttributeError):
        return None
    return libc


def _malloc_stats(libc) -> str:
    """What ``malloc_stats()`` prints to file descriptor 2, captured."""
    with tempfile.TemporaryFile() as f:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            libc.malloc_stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return f.read().decode("ascii", "replace")
