"""Host memory over a load and a few decode steps, per io mode, against dense + budget + 10% of the checkpoint.

Writes a Mixtral-structured random checkpoint (``benchmarks/decode.py``'s shapes and writer; by default the
``mini`` shape with 12 layers, 2.06 GiB, fused experts; ``--layout per_expert`` stores them as hub checkpoints
do), then, for each ``--io`` mode in a fresh child process with the checkpoint's pages dropped from the page cache
first: load it on CPU with ``--fraction`` of its experts as slots, prefill 16 tokens and take ``--steps`` greedy
decode steps (router-chosen routing). The child reports, as growth over its memory just before
``offload_moe.load`` (the modules already imported):

- ``rss``: peak resident memory (VmHWM) over the load alone and over load + decode;
- ``anon``: the peak of RssAnon, sampled every millisecond by a thread: the process's own memory;
- ``file``: the peak of RssFile, sampled likewise: mapped file pages, which with ``io="mmap"`` are the
  checkpoint's, page cache that the kernel may reclaim (clean, never written) rather than memory this process
  owns;
- ``runtime`` ("allocated"): the peak of the bytes held in allocations of 64 KiB or more (torch's tensors and
  buffers), counted by malloc (``offload_moe.memory.AllocationPeak``), in a second child process: what the
  runtime allocates, without the noise of RSS;
- with ``--cgroup``: the peak of the memory cgroup the child runs in (no limit that binds), that is RSS plus the
  page cache its reads brought in (buffered reads, the mapped pages), as a machine's memory accounting sees it.

Target (issue 17): each <= dense weights + budget + 10% of the checkpoint.

    python benchmarks/load_memory.py                                  # mini shape, 12 layers, 2.06 GiB
    python benchmarks/load_memory.py --shape mixtral --layers 2       # Mixtral-8x7B layers, 5.6 GB
    python benchmarks/load_memory.py --cgroup --json out.json         # + the cgroup's peak (Linux, root)
    python benchmarks/load_memory.py --layers 8 --layout per_expert   # experts stored apart, as on the hub
    python benchmarks/load_memory.py --shape small --layers 2         # ~25 MiB, what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks.decode, benchmarks.cgroups

from benchmarks.decode import SHAPES, decode, drop_file_pages, machine  # noqa: E402

SHAPES = dict(SHAPES, small=dict(model_type="mixtral", hidden_size=256, intermediate_size=896, num_local_experts=8,
                                 num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=4,
                                 vocab_size=4000))
IO_MODES = ("direct", "mmap", "auto", "buffered")
FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in bytes (VmHWM: the peak of VmRSS so far; it
    belongs to the process image, unlike ru_maxrss, which a child started with fork+exec inherits)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Polls /proc/self/status every ``interval`` seconds and keeps the peak of each figure."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, status(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.take()

    def take(self) -> dict[str, int]:
        now = status()
        for key, value in now.items():
            self.peak[key] = max(self.peak.get(key, 0), value)
        return now

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join()
        self.take()
        return dict(self.peak)


def own_cgroup_usage() -> int | None:
    """What this process's memory cgroup (the innermost, v1 or v2) charges now, or None without one."""
    from offload_moe.memory import memory_cgroups

    for version, folder, _ in memory_cgroups():
        name = "memory.current" if version == 2 else "memory.usage_in_bytes"
        try:
            return int((folder / name).read_text())
        except (OSError, ValueError):
            continue
    return None


def child(folder: str, fraction: float, io: str, steps: int, count: bool) -> dict:
    """Runs in a fresh process: measure the load, then the load and ``steps`` decode steps. With ``count``, the
    bytes allocated (``AllocationPeak``, which changes how malloc serves large allocations, so RSS is measured in
    another process); else RSS."""
    import offload_moe
    from offload_moe.loader import build_skeleton, checkpoint_renamer, load_config, swap_experts
    from offload_moe.memory import AllocationPeak

    # Import everything the load imports before measuring (first imports compile and allocate);
    # the skeleton holds no weights.
    skeleton = build_skeleton(load_config(Path(folder)))
    total_experts = sum(m.num_experts for m in swap_experts(skeleton))
    checkpoint_renamer(skeleton)
    del skeleton
    settings = {} if io == "auto" else {"io": io}
    before, cgroup_before = status(), own_cgroup_usage()
    sampler = None if count else Sampler()
    counter = AllocationPeak() if count else None
    if sampler is not None:
        sampler.start()
    if counter is not None:
        counter.__enter__()
    start = time.perf_counter()
    model = offload_moe.load(folder, device="cpu", cache_experts=max(2, round(total_experts * fraction)),
                             prefetch="none", progress=False, **settings)
    seconds = time.perf_counter() - start
    at_load = counter.so_far() if counter is not None else status()["VmHWM"] - before["VmRSS"]
    decoded = decode(model, "cpu", steps, None, warmup=0)
    stats = model.offload.stats()
    dense = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    out = {"io": io, "io_chosen": stats["io"], "dense_bytes": dense, "budget_bytes": stats["resident_bytes"],
           "capacity_experts": stats["capacity_experts"], "total_experts": stats["total_experts"],
           "mapped_experts": stats["mapped_experts"], "misses": stats["misses"], "load_seconds": seconds,
           "tokens_per_s": decoded["tokens_per_s"], "load": at_load}
    if counter is not None:
        counter.__exit__(None, None, None)
        return dict(out, runtime=counter.peak)
    peak = sampler.stop()
    return dict(out, before=before, cgroup_before=cgroup_before, rss=peak["VmHWM"] - before["VmRSS"],
                anon=peak["RssAnon"] - before["RssAnon"], file=peak["RssFile"] - before["RssFile"])


def run_mode(folder: Path, io: str, args, cgroup_limit: int | None) -> dict:
    """One mode in two fresh child processes, each starting with the checkpoint out of the page cache: RSS (in a
    memory cgroup of ``cgroup_limit`` bytes if given), then the allocations counted."""
    from benchmarks.cgroups import run_limited

    out = {}
    for count in (False, True):
        drop_file_pages(sorted(folder.glob("*.safetensors")))
        command = [sys.executable, __file__, "--child", str(folder), "--io", io, "--fraction", str(args.fraction),
                   "--steps", str(args.steps)] + (["--count"] if count else [])
        done = run_limited(command, None if count else cgroup_limit)
        if done.returncode != 0:
            raise SystemExit(f"io={io}: {done.error(tail=5)}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if done.peak_bytes is not None and result.get("cgroup_before") is not None:
            result["cgroup"] = done.peak_bytes - result["cgroup_before"]
        if count:
            out.update(runtime=result["runtime"], runtime_load=result["load"])
        else:
            out.update(result, load_rss=result.pop("load"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mini")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--layout", choices=("fused", "per_expert"), default="fused",
                        help="experts as fused 3D tensors (decode.py's checkpoints) or a tensor per expert (the hub's)")
    parser.add_argument("--io", default=",".join(IO_MODES), help="modes to measure, comma separated")
    parser.add_argument("--fraction", type=float, default=0.25, help="share of experts in the budget")
    parser.add_argument("--steps", type=int, default=4, help="decode steps after the 16-token prefill")
    parser.add_argument("--cgroup", action="store_true",
                        help="run each mode in a memory cgroup (a limit of the machine's RAM) and report its peak")
    parser.add_argument("--folder", help="reuse (or keep) the checkpoint here instead of a temp folder")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.fraction, args.io, args.steps, args.count)))
        return

    import psutil

    modes = [m for m in args.io.split(",") if m]
    unknown = [m for m in modes if m not in IO_MODES]
    if unknown:
        raise SystemExit(f"--io {','.join(unknown)}: not a mode; use some of {','.join(IO_MODES)}")
    limit = psutil.virtual_memory().total if args.cgroup else None
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        folder = Path(args.folder or Path(tmp) / f"{args.shape}-{args.layers}-{args.layout}")
        if not (folder / "config.json").exists():
            write_checkpoint(args.shape, args.layers, args.layout, folder)
        checkpoint = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        results = [run_mode(folder, io, args, limit) for io in modes]
    for r in results:
        r["checkpoint_bytes"] = checkpoint
        r["target_bytes"] = r["dense_bytes"] + r["budget_bytes"] + checkpoint // 10
    report = {"shape": args.shape, "layers": args.layers, "layout": args.layout, "fraction": args.fraction,
              "steps": args.steps,
              "checkpoint_bytes": checkpoint, "load_average": {"start": load_start, "end": os.getloadavg()},
              "machine": machine("cpu"),
              "results": results}
    print_table(report)
    if args.json:
        from offload_moe.atomic import atomic_write

        atomic_write(args.json, json.dumps(report, indent=2).encode())


def write_checkpoint(shape: str, layers: int, layout: str, folder: Path) -> None:
    """``benchmarks/decode.py``'s checkpoint (bf16, fused experts), or with ``layout="per_expert"`` a tensor per
    projection per expert, as most hub checkpoints hold them (the gate and up projections apart: row blocks of the
    slot's ``gate_up_proj``)."""
    from offload_moe.synthetic import write_synthetic_checkpoint

    kwargs = dict(SHAPES[shape])
    print(f"writing a {shape}-shaped checkpoint ({layout}) with {layers} layers to {folder} ...", file=sys.stderr)
    write_synthetic_checkpoint(folder, kwargs.pop("model_type"), dtype=torch.bfloat16, num_hidden_layers=layers,
                               max_position_embeddings=4096, tie_word_embeddings=False, shard_bytes=2 * 2**30,
                               layout=layout, **kwargs)


def print_table(report: dict) -> None:
    mib = 2**20
    r0, load = report["results"][0], report["load_average"]

    def m(v):
        return "-" if v is None else f"{v / mib:.0f}"

    print(f"\n{report['shape']} shape, {report['layers']} layers ({report['layout']}), "
          f"checkpoint {m(report['checkpoint_bytes'])} MiB, dense {m(r0['dense_bytes'])} MiB, "
          f"budget {m(r0['budget_bytes'])} MiB "
          f"({r0['capacity_experts']}/{r0['total_experts']} experts), 16-token prefill + {report['steps']} steps, "
          f"load average {load['start'][0]:.1f} -> {load['end'][0]:.1f}")
    print("| io (chosen) | bound | load RSS | RSS | anon | mapped file | allocated | cgroup "
          "| x bound (RSS, anon, allocated, cgroup) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        bound, cg = r["target_bytes"], r.get("cgroup")
        ratios = ", ".join("-" if v is None else f"{v / bound:.2f}" for v in (r["rss"], r["anon"], r["runtime"], cg))
        print(f"| {r['io']} ({r['io_chosen']}) | {m(bound)} | {m(r['load_rss'])} | {m(r['rss'])} | {m(r['anon'])} | "
              f"{m(r['file'])} | {m(r['runtime'])} | {m(cg)} | {ratios} |")
    print("(MiB of growth over the process just before load)")

if __name__ == "__main__":
    main()
