"""Atomic writes: temporary files of killed writers are cleaned by the next write; a set of files is all or nothing."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from offload_moe.atomic import atomic_write, atomic_write_all, output_folder, remove_stale_temporaries
from offload_moe.errors import OutputError

ROOT = Path(__file__).resolve().parents[1]

# A writer that stops halfway through its content and waits to be killed. It imports offload_moe.atomic
# without the package's __init__ (and so without torch), to start in a fraction of a second.
BLOCKED_WRITER = """
import sys, time, types
package = types.ModuleType("offload_moe"); package.__path__ = [sys.argv[1]]; sys.modules["offload_moe"] = package
from offload_moe.atomic import atomic_write

def content(f):
    f.write(b"half of the new file")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

atomic_write(sys.argv[2], content)
"""


def blocked_writer(target: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", BLOCKED_WRITER, str(ROOT / "offload_moe"), str(target)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    return child


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_the_next_write_removes_what_a_killed_writer_left_but_not_a_live_writers_file(tmp_path):
    target = tmp_path / "manifest.json"
    killed, live = blocked_writer(target), blocked_writer(target)
    try:
        assert len(temporaries(tmp_path)) == 2
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert len(temporaries(tmp_path)) == 2  # the kill left its temporary file

        atomic_write(target, b"new")
        assert target.read_bytes() == b"new"
        [left] = temporaries(tmp_path)  # only the live writer's remains
        assert left.startswith(f".manifest.json.offload-moe-{live.pid}-")
    finally:
        for child in (killed, live):
            child.kill()
            child.wait(10)
    assert len(remove_stale_temporaries(target)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_stale_temporaries_of_other_targets_are_left_alone(tmp_path):
    dead = 2**22 + 12345  # above Linux's largest PID, so no process has it
    other = tmp_path / f".other.json.offload-moe-{dead}-00ff.tmp"
    other.write_bytes(b"x")
    stale = tmp_path / f".a.json.offload-moe-{dead}-00ff.tmp"
    stale.write_bytes(b"x")
    atomic_write(tmp_path / "a.json", b"{}")
    assert not stale.exists() and other.exists()


def test_a_stale_temporary_folder_goes_with_its_contents_a_live_ones_stays(tmp_path):
    dead = 2**22 + 12345
    stale = tmp_path / f".out.offload-moe-{dead}-00ff.tmp"
    (stale / "inner").mkdir(parents=True)
    (stale / "inner" / "x.safetensors").write_bytes(b"x")
    live = tmp_path / f".out.offload-moe-{os.getpid()}-00ff.tmp"
    live.mkdir()
    assert remove_stale_temporaries(tmp_path / "out") == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def enospc_on_call(monkeypatch, failing_call: int) -> None:
    """Make the ``failing_call``-th fsync fail as a full disk does."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr("offload_moe.atomic.os.fsync", fsync)


def test_a_set_of_files_is_written_all_or_nothing(tmp_path, monkeypatch):
    old = atomic_write_all({tmp_path / "a.json": b"old a", tmp_path / "a.csv": b"old csv"})
    enospc_on_call(monkeypatch, 2)
    with pytest.raises(OutputError, match=r"cannot write .*a\.csv: No space left on device"):
        atomic_write_all({tmp_path / "a.json": b"new a", tmp_path / "a.csv": b"new csv"})
    assert [p.read_bytes() for p in old] == [b"old a", b"old csv"]  # the previous complete set
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.json"]


def test_a_failed_write_removes_the_folders_it_made(tmp_path, monkeypatch):
    enospc_on_call(monkeypatch, 1)
    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write(tmp_path / "new" / "deeper" / "trace.safetensors", b"data")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_block_removes_the_output_folder_it_made(tmp_path):
    with pytest.raises(OutputError), output_folder(tmp_path / "out" / "run") as out:
        atomic_write(out / "results.json", lambda f: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    assert list(tmp_path.iterdir()) == []
