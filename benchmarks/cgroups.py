"""Run a command in a fresh memory cgroup of N bytes, as on a machine with that much RAM (page cache included).

``benchmarks/decode.py --memory-limit`` and the llama.cpp side by side (``benchmarks/peers``) run each
configuration this way. The group is made below this process's own memory cgroup (found by
``offload_moe.memory.memory_cgroups``): cgroup v1's memory controller (``memory.limit_in_bytes``), else a
cgroup v2 child (``memory.max``, swap off; the parent must delegate the memory controller). Needs root or a
delegated subtree. The command joins the group before it starts (a shell writes its pid, then execs it), so
every page it maps or reads is charged there. The group is removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

OUT_OF_MEMORY = "killed: out of memory in the cgroup"
JOIN = 'echo $$ > "$0" && exec "$@"'  # sh -c JOIN PROCS COMMAND...: the command starts inside the group


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str | None
    peak_bytes: int | None = None

    @property
    def killed(self) -> bool:
        """Killed by SIGKILL (-9 from Python, 137 from a shell): in a cgroup, the kernel's out-of-memory kill."""
        return self.returncode in (-9, 137)

    def error(self, label: str = "exit status", tail: int = 0) -> str:
        """Why the command failed: ``OUT_OF_MEMORY`` if it was killed, else ``label`` and the exit status, with
        the last ``tail`` lines of its stderr."""
        if self.killed:
            return OUT_OF_MEMORY
        lines = (self.stderr or "").strip().splitlines()[-tail:] if tail else []
        return f"{label} {self.returncode}" + (f": {' | '.join(lines)}" if lines else "")


def run_limited(command: list[str], limit: int | None, *, env: dict | None = None,
                capture_stderr: bool = True) -> Done:
    """Run ``command``, its stdout (and, with ``capture_stderr``, its stderr) captured; with ``limit`` bytes, in a
    fresh ``MemoryCgroup`` of that size, removed afterwards, whose peak memory comes back as ``peak_bytes``."""
    stderr = subprocess.PIPE if capture_stderr else None
    if limit is None:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        return Done(done.returncode, done.stdout, done.stderr)
    group = MemoryCgroup(limit)
    try:
        done = subprocess.run(["sh", "-c", JOIN, str(group.procs), *command], stdout=subprocess.PIPE, stderr=stderr,
                              text=True, env=env)
        peak = group.peak()
    finally:
        group.remove()
    return Done(done.returncode, done.stdout, done.stderr, peak)


class MemoryCgroup:
    """A fresh memory cgroup of ``limit`` bytes below this process's own: cgroup v1's memory controller
    (``memory.limit_in_bytes``), else a v2 child (``memory.max``; the parent must delegate the memory controller).
    Needs root, or a delegated subtree. ``proc``: whose cgroups (a fake /proc tree in tests)."""

    def __init__(self, limit: int, proc: Path = Path("/proc/self")):
        from offload_moe.memory import memory_cgroups

        found = memory_cgroups(proc)
        if not found:
            raise SystemExit("memory limit: this process is in no memory cgroup that can be found in "
                             "/proc/self/cgroup and /proc/self/mountinfo (Linux with cgroups is needed)")
        errors = []
        for version, parent, _mount in found:
            name = f"offload-moe-bench-{os.getpid()}-{time.monotonic_ns()}"
            self.folder, self.version = parent / name, version
            try:
                if version == 2:
                    control = (parent / "cgroup.subtree_control").read_text().split()
                    if "memory" not in control:
                        (parent / "cgroup.subtree_control").write_text("+memory\n")
                self.folder.mkdir()
                setting = "memory.max" if version == 2 else "memory.limit_in_bytes"
                (self.folder / setting).write_text(f"{limit}\n")
                if version == 2 and (self.folder / "memory.swap.max").exists():
                    (self.folder / "memory.swap.max").write_text("0\n")  # as a machine with this RAM and no swap
                self.procs = self.folder / "cgroup.procs"
                return
            except OSError as e:
                errors.append(f"cgroup v{version} at {parent}: {e.strerror or e}")
                if self.folder.exists():
                    self.folder.rmdir()
        raise SystemExit("memory limit: cannot make a memory cgroup (" + "; ".join(errors) + "); run as root, "
                         "or in a cgroup v2 subtree delegated to you with the memory controller, or without a "
                         "memory limit")

    def peak(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.folder / name).read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        for _ in range(50):  # the last task's exit is seen a moment after wait() returns
            try:
                self.folder.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        print(f"could not remove the cgroup {self.folder}; remove it with rmdir", file=sys.stderr)
