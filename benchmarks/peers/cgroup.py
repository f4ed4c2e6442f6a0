"""Run a command in a fresh memory cgroup of N bytes, as on a machine with that much RAM (page cache included).

A small stand-in for the cgroup handling benchmarks/decode.py gains with ``--memory-limit`` (branch k17-auto,
not merged when this was written); the one need here is "run this command in a cgroup of N bytes". The group
is made below this process's own memory cgroup: cgroup v1's memory controller (``memory.limit_in_bytes``),
else cgroup v2 (``memory.max``, swap off). Needs root or a delegated subtree. The command joins the group
before it starts (a shell writes its pid, then execs it), so every page it reads is charged there.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int | None = None


def run_limited(command: list[str], limit: int | None, *, env: dict | None = None) -> Done:
    """Run ``command``; with ``limit`` bytes, in a fresh memory cgroup of that size, removed afterwards."""
    if limit is None:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        return Done(done.returncode, done.stdout, done.stderr)
    group = make_group(limit)
    try:
        wrapped = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *command]
        done = subprocess.run(wrapped, capture_output=True, text=True, env=env)
        peak = _peak(group)
    finally:
        _remove(group)
    return Done(done.returncode, done.stdout, done.stderr, peak)


def own_groups(proc_cgroup: str, mountinfo: str) -> list[tuple[int, Path]]:
    """(version, folder) of this process's memory cgroups, v1 first, from /proc/self/cgroup and mountinfo."""
    mounts = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, fstype = left.split(), right.split()
        if not fstype or len(fields) < 5:
            continue
        if fstype[0] == "cgroup" and "memory" in right.split()[-1].split(","):
            mounts[1] = (fields[3], Path(fields[4]))
        elif fstype[0] == "cgroup2":
            mounts.setdefault(2, (fields[3], Path(fields[4])))
    found = []
    for line in proc_cgroup.splitlines():
        hid, controllers, path = line.split(":", 2)
        version = 2 if hid == "0" and controllers == "" else 1 if "memory" in controllers.split(",") else None
        if version in mounts:
            root, mount_point = mounts[version]
            relative = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
            found.append((version, (mount_point / relative).resolve() if relative != "." else mount_point))
    return sorted(found)


def make_group(limit: int) -> Path:
    groups = own_groups(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
    errors = []
    for version, parent in groups:
        folder = parent / f"offload-moe-peer-{os.getpid()}-{time.monotonic_ns()}"
        try:
            if version == 2 and "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                (parent / "cgroup.subtree_control").write_text("+memory\n")
            folder.mkdir()
            (folder / ("memory.max" if version == 2 else "memory.limit_in_bytes")).write_text(f"{limit}\n")
            if version == 2 and (folder / "memory.swap.max").exists():
                (folder / "memory.swap.max").write_text("0\n")
            return folder
        except OSError as e:
            errors.append(f"cgroup v{version} at {parent}: {e.strerror or e}")
            if folder.exists():
                folder.rmdir()
    raise SystemExit("cannot make a memory cgroup (" + ("; ".join(errors) or "no memory cgroup found in "
                     "/proc/self/cgroup") + "); run as root, or without a memory limit")


def _peak(group: Path) -> int | None:
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        try:
            return int((group / name).read_text())
        except (OSError, ValueError):
            continue
    return None


def _remove(group: Path) -> None:
    for _ in range(50):  # the last task's exit is seen a moment after wait() returns
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
