"""memory.py: the memory cgroup limits a process is under (fake /proc and /sys trees), and io="auto"'s rule."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import offload_moe
from offload_moe import memory
from offload_moe.cli import app
from offload_moe.config import OffloadConfig
from offload_moe.errors import ConfigError
from offload_moe.memory import MemoryRoom, cgroup_limit, choose_io, memory_cgroups, memory_room

pytestmark = pytest.mark.io_auto
GiB = 2**30
V1_MOUNTS = ("35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory\n"
             "32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu\n")
V2_MOUNT = "41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw\n"


def fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo.format(root=tmp_path / "sys"))
    return proc


def cgroup_files(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_cgroup_v1_limit_less_usage_plus_the_page_cache_it_can_drop(tmp_path):
    proc = fake_proc(tmp_path, "4:memory:/jobs/a\n3:cpu:/\n0::/\n", V1_MOUNTS + V2_MOUNT)
    cgroup_files(tmp_path / "sys/memory/jobs/a", memory_limit_in_bytes=f"{3 * GiB}\n",
                 memory_usage_in_bytes=f"{2 * GiB}\n", memory_stat=f"cache 7\ntotal_cache {GiB}\nrss 5\n")
    found = cgroup_limit(proc)
    assert found.version == 1 and found.folder == tmp_path / "sys/memory/jobs/a"
    assert (found.limit, found.usage, found.file_pages, found.free) == (3 * GiB, 2 * GiB, GiB, 2 * GiB)
    room = memory_room(proc, available=20 * GiB)
    assert room == MemoryRoom(2 * GiB, "cgroup memory.limit_in_bytes 3.00 GiB")


def test_cgroup_v2_memory_max_and_the_tightest_ancestor(tmp_path):
    proc = fake_proc(tmp_path, "0::/user.slice/app\n", V2_MOUNT)
    base = tmp_path / "sys/unified"
    cgroup_files(base / "user.slice", memory_max=f"{4 * GiB}\n", memory_current=f"{3 * GiB}\n", memory_stat="file 0\n")
    cgroup_files(base / "user.slice/app", memory_max="max\n", memory_current=f"{GiB}\n",
                 memory_stat=f"anon {GiB}\nfile 0\n")
    found = cgroup_limit(proc)  # the child has no limit; its parent's leaves 1 GiB
    assert found.version == 2 and found.folder == base / "user.slice" and found.free == GiB
    assert memory_room(proc, available=8 * GiB).bound == "cgroup memory.max 4.00 GiB"


def test_no_limit_no_cgroup_or_no_proc_leaves_mem_available(tmp_path):
    proc = fake_proc(tmp_path, "4:memory:/\n0::/\n", V1_MOUNTS + V2_MOUNT)
    cgroup_files(tmp_path / "sys/memory", memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes="5\n")
    assert cgroup_limit(proc) is None
    assert memory_room(proc, available=5 * GiB) == MemoryRoom(5 * GiB, "MemAvailable")
    assert cgroup_limit(tmp_path / "no-such-proc") is None and memory_cgroups(tmp_path / "no-such-proc") == []
    unmounted = fake_proc(tmp_path / "other", "4:memory:/a\n", "")  # listed, but no cgroup file system mounted
    assert cgroup_limit(unmounted) is None


def test_a_limit_above_mem_available_leaves_mem_available(tmp_path):
    proc = fake_proc(tmp_path, "0::/a\n", V2_MOUNT)
    cgroup_files(tmp_path / "sys/unified/a", memory_max=f"{64 * GiB}\n", memory_current="0\n")
    assert memory_room(proc, available=2 * GiB) == MemoryRoom(2 * GiB, "MemAvailable")


def test_a_container_mounts_its_own_part_of_the_hierarchy(tmp_path):
    """mountinfo's root field: a container sees /docker/abc mounted at the mount point itself."""
    mountinfo = "35 31 0:32 /docker/abc {root}/my\\040memory rw - cgroup cgroup rw,memory\n"
    proc = fake_proc(tmp_path, "4:memory:/docker/abc\n", mountinfo)
    cgroup_files(tmp_path / "sys/my memory", memory_limit_in_bytes=f"{GiB}\n", memory_usage_in_bytes="0\n")
    assert memory_cgroups(proc) == [(1, tmp_path / "sys/my memory", tmp_path / "sys/my memory")]
    assert cgroup_limit(proc).limit == GiB


def test_this_machine_reads_without_error():
    room = memory_room()
    assert room.available >= 0 and room.bound


def auto(experts: float, slots: float = 0.25, dense: float = 0.5, available: float = 10, host=False,
         device="cpu", bound="MemAvailable"):
    room = MemoryRoom(int(available * GiB), bound)
    return choose_io("auto", device=torch.device(device), experts_bytes=int(experts * GiB),
                     slots_bytes=int(slots * experts * GiB), dense_bytes=int(dense * GiB), host_tier=host, room=room)


def test_auto_maps_the_experts_while_they_fit_and_reads_into_slots_when_not():
    fits = auto(1.4, available=9.8)
    assert fits.io == "mmap" and fits.reason.startswith("auto: the experts, 1.40 GiB, fit in the 8.32 GiB")
    assert "MemAvailable: 9.80 GiB, less 512.00 MiB of dense weights" in fits.reason
    over = auto(6.0, available=3.0, bound="cgroup memory.max 3.00 GiB")
    assert over.io == "direct" and "exceed the 2.20 GiB this process may use (cgroup memory.max 3.00 GiB" in over.reason
    margin = auto(9.0, slots=0.7, available=10)  # a margin: 9 + 0.5 GiB of dense weights leave less than 10%
    assert margin.io == "direct" and "the experts, 9.00 GiB, exceed the 8.50 GiB" in margin.reason


def test_auto_maps_experts_that_do_not_fit_where_the_page_cache_holds_well_over_the_slots():
    over = auto(6.0, slots=0.1, available=3.0)  # 2.2 GiB left for 0.6 GiB of slots: the page cache keeps more
    assert over.io == "mmap" and "holds 3.7x the slots, 614.40 MiB (mmap from 1.5x)" in over.reason
    near = auto(6.0, slots=0.3, available=3.0)  # 2.2 GiB against 1.8 GiB of slots: the slots' policy keeps them
    assert near.io == "direct" and "holds little more than the slots, 1.80 GiB" in near.reason
    assert auto(6.0, slots=0.24, available=3.0).io == "mmap"  # 1.44 GiB of slots: 2.2 GiB is just over 1.5x
    assert auto(6.0, slots=0.25, available=3.0).io == "direct"  # 1.5 GiB: just under


def test_auto_keeps_the_page_cache_when_not_even_the_slots_fit():
    choice = auto(6.0, slots=0.5, available=2.0)  # 3 GiB of slots in 2 GiB: direct would be killed, mmap slows
    assert choice.io == "mmap" and "nor the slots, 3.00 GiB" in choice.reason


def test_auto_reads_into_slots_on_a_gpu_with_a_host_tier_or_when_the_slots_hold_everything():
    assert auto(1.0, device="cuda").io == "direct"
    assert auto(1.0, host=True).io == "direct"
    whole = auto(1.0, slots=1.0)
    assert whole.io == "direct" and "hold every expert" in whole.reason
    asked = choose_io("mmap", device=torch.device("cpu"), experts_bytes=10 * GiB, slots_bytes=GiB, dense_bytes=0,
                      host_tier=False, room=MemoryRoom(GiB, "MemAvailable"))
    assert (asked.io, asked.reason) == ("mmap", "as asked")


def test_config_takes_auto_everywhere_and_it_is_the_default():
    assert OffloadConfig().io == "auto" and OffloadConfig(io=None).io == "auto"
    assert OffloadConfig(io="auto", host_memory="1GiB").io == "auto"  # auto reads into slots beside a host tier
    offload_moe.values.check_io("auto", device=torch.device("cuda"))
    with pytest.raises(ConfigError, match="io='fast' is not an I/O mode; use one of auto, buffered"):
        OffloadConfig(io="fast")
    with pytest.raises(ConfigError, match="is not a read mode"):
        offload_moe.safetensors_io.FileReader("auto")


@pytest.mark.parametrize("room_for, chosen", [(12, "mmap"), (4, "direct")])  # experts beside the dense weights
def test_load_resolves_auto_once_and_says_why(model_dir, monkeypatch, room_for, chosen):
    sizes = offload_moe.plan(model_dir("mixtral"), device_memory="1TiB", dtype="float32")  # 12 experts
    available = sizes.dense_bytes + room_for * sizes.expert_bytes
    monkeypatch.setattr(memory, "MIN_MARGIN", 0)
    monkeypatch.setattr(memory, "MARGIN", 0)
    monkeypatch.setattr(memory, "memory_room", lambda *a, **k: MemoryRoom(available, "MemAvailable"))
    model = offload_moe.load(model_dir("mixtral"), cache_experts=3, dtype="float32", progress=False)
    try:
        model(torch.randint(0, 96, (1, 4)))
        stats = model.offload.stats()
        assert stats["io"] == chosen and stats["io_reason"].startswith("auto: the experts")
        assert (stats["mapped_experts"] > 0) == (chosen == "mmap")
    finally:
        model.offload.close()
    asked = offload_moe.load(model_dir("mixtral"), cache_experts=3, dtype="float32", io="buffered", progress=False)
    assert (asked.offload.stats()["io"], asked.offload.stats()["io_reason"]) == ("buffered", "as asked")
    asked.offload.close()


def test_plan_shows_the_choice_and_the_reason(model_dir, monkeypatch):
    monkeypatch.setattr(memory, "memory_room", lambda *a, **k: MemoryRoom(64 * GiB, "MemAvailable"))
    p = offload_moe.plan(model_dir("mixtral"), device_memory="300MiB", dtype="float32")
    assert p.io == "direct" and p.io_line == "io: direct (auto: the slots hold every expert, so each is read into its slot once)"
    result = CliRunner().invoke(app, ["plan", str(model_dir("mixtral")), "--device-memory", "1GiB"])
    assert result.exit_code == 0 and "io: direct (auto: the slots hold every expert" in result.output
    small = offload_moe.plan(offload_moe.demo_model_path(), device_memory="280MiB")
    assert small.expert_slots < small.total_experts and small.io == "mmap", small
    assert "io: mmap (auto: the experts" in str(small) and small.as_dict()["io_reason"].startswith("auto: the experts")


def _cgroups_writable() -> bool:
    found = memory_cgroups()
    if os.geteuid() != 0 or not found or found[0][0] != 1:
        return False  # v1 as root, where the benchmark is checked; v2 needs a delegated subtree
    return os.access(found[0][1], os.W_OK)


def _decode():
    spec = importlib.util.spec_from_file_location("decode_benchmark", Path(__file__).parent.parent / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not _cgroups_writable(), reason="needs a writable cgroup v1 memory controller (root)")
def test_the_benchmark_cgroup_bounds_a_child_and_is_removed():
    group = _decode().MemoryCgroup(64 * 2**20)
    try:
        shell = 'echo $$ > "$0" && exec "$@"'
        big = subprocess.run(["sh", "-c", shell, str(group.procs), "python3", "-c", "b = bytearray(200 * 2**20)"])
        assert big.returncode in (-9, 137)  # killed at the limit
        assert group.peak() is not None and group.peak() <= 64 * 2**20
    finally:
        group.remove()
    assert not group.folder.exists()


def test_the_benchmark_parses_limits_and_columns():
    decode = _decode()
    assert decode.parse_limit("0.5x", 3 * GiB) == 3 * GiB // 2 and decode.parse_limit("4GiB", 1) == 4 * GiB
    assert decode._columns("lru,lru mmap,lru auto", "", "cpu") == ["lru", "lru mmap", "lru auto"]
    assert decode._columns("lru,lru mmap", "", "cuda") == ["lru"]
    with pytest.raises(SystemExit, match="unknown column"):
        decode._columns("fastest", "", "cpu")
