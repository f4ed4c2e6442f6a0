"""offload_moe and llama.cpp decoding the same synthetic checkpoint, interleaved, at one thread count.

``benchmarks/decode.py --peers llama.cpp`` calls ``run``. For each precision pair (ours bf16 beside
llama.cpp f16, int8 beside q8_0, int4 beside q4_0: ``offload_moe.quantize_experts`` and llama.cpp's own
converter and quantizer, from the same bf16 file bytes), each round runs, one process each:

- llama.cpp (llama-bench, its defaults: mmap, CPU repacking), everything in RAM;
- ours at each budget (share of the experts in slots), everything in RAM (``in_ram_variant``);
- with ``limit_share``: both in a memory cgroup of that share of our checkpoint's bytes at that precision
  (0.5: page cache bounded to half the checkpoint), ours at the smallest budget (``limited_variant``),
  llama.cpp with ``--repack 0``: repacking copies q8_0 / q4_0 weights out of the mapping into anonymous
  memory, which cannot fit in less memory than the model; without it they are computed from the mapping.

Before a run in RAM the files it reads are read once (the page cache is warm, as "everything in RAM"
means); before a run in a cgroup they are dropped from the page cache, so it starts cold. Rounds repeat
the whole set (``repeats``); tables give medians with every run's figure.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

PAIRS = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0"}  # ours -> llama.cpp at the same precision
BITS = {"int8": 8, "int4": 4}
TARGET_IN_RAM = 1.0  # issue 17: ours / llama.cpp, everything in RAM
TARGET_LIMITED = 2.0  # issue 17: ours / llama.cpp, page cache bounded to half the checkpoint


@dataclass(frozen=True)
class Config:
    """One column of the side by side: who, at which precision, with how many experts, in how much memory."""

    side: str  # "ours" or "llama.cpp"
    precision: str  # bf16 / int8 / int4, or f16 / q8_0 / q4_0
    files: tuple[Path, ...]  # what it reads: warmed or dropped before each run
    budget: float | None = None  # ours: share of the experts in slots
    capacity: int | None = None
    variant: str | None = None  # ours: a benchmarks/decode.py variant ("full mmap", "full", ...)
    limit: int | None = None  # bytes of the memory cgroup, None: unlimited

    @property
    def name(self) -> str:
        where = f", cgroup {self.limit / 2**30:.2f} GiB" if self.limit else ""
        if self.side == "ours":
            return f"ours {self.precision} {self.budget:.0%} {self.variant}{where}"
        return f"llama.cpp {self.precision}{where}"

    @property
    def pair(self) -> str:
        """The precision pair's name: ours' side of it."""
        return self.precision if self.side == "ours" else {v: k for k, v in PAIRS.items()}[self.precision]


def plan_configs(ours: dict[str, Path], gguf: dict[str, Path], *, budgets: list[float], total_experts: int,
                 in_ram_variant: str = "full mmap", limited_variant: str = "full",
                 limit_share: float | None = None) -> list[Config]:
    """The configurations of one round, grouped by precision pair (the page cache serves a pair's files in
    turn): llama.cpp, then ours at each budget, then, with ``limit_share``, both in a cgroup."""
    from benchmarks.decode import expert_capacity as capacity

    configs = []
    for precision, folder in ours.items():
        peer = PAIRS[precision]
        ours_files = tuple(sorted(folder.glob("*.safetensors")))
        peer_files = (gguf[peer],)
        configs.append(Config("llama.cpp", peer, peer_files))
        for share in budgets:
            configs.append(Config("ours", precision, ours_files, share, capacity(share, total_experts),
                                  in_ram_variant))
        if limit_share is not None:
            limit = int(limit_share * sum(f.stat().st_size for f in ours_files))
            share = min(budgets)
            configs.append(Config("llama.cpp", peer, peer_files, limit=limit))
            configs.append(Config("ours", precision, ours_files, share, capacity(share, total_experts),
                                  limited_variant, limit))
    return configs


@dataclass
class Runs:
    config: Config
    results: list[dict] = field(default_factory=list)

    def speeds(self) -> list[float]:
        return [r["tokens_per_s"] for r in self.results if "tokens_per_s" in r]

    def median(self) -> float | None:
        speeds = self.speeds()
        return statistics.median(speeds) if speeds else None

    def summary(self) -> str:
        speeds, errors = self.speeds(), [r["error"] for r in self.results if "error" in r]
        if not speeds:
            return "oom" if any("out of memory" in e for e in errors) else "failed"
        spread = f" ({min(speeds):.2f}-{max(speeds):.2f})" if len(speeds) > 1 else ""
        return f"{statistics.median(speeds):.2f}{spread}" + (f", {len(errors)} failed" if errors else "")


def run_config(config: Config, *, llama, threads: int, tokens: int) -> dict:
    """One run of ``config`` in a child process (in a cgroup if it has a limit); its result or ``error``. Ours runs
    as ``benchmarks/decode.py --child`` (``run_offload``: 16 prompt tokens, 2 untimed decode steps, then the timed
    ones) at ``threads`` threads, a fresh process each time, as llama-bench runs."""
    from benchmarks import decode
    from benchmarks.cgroups import run_limited
    from benchmarks.peers.llama_cpp import bench

    if config.limit is None:
        warm(config.files)
    else:
        decode.drop_file_pages(config.files)
    if config.side == "llama.cpp":
        extra = ("--repack", "0") if config.limit else ()
        result = bench(llama, config.files[0], threads=threads, tokens=tokens, repeats=2, memory_limit=config.limit,
                       extra=extra)
        if "samples_tokens_per_s" in result:  # the first repetition is one more warm-up (it can stall ~1 s)
            result["tokens_per_s"] = result["samples_tokens_per_s"][-1]
            result["s_per_token"] = 1.0 / result["tokens_per_s"]
        return result
    spec = {"kind": "offload", "folder": str(config.files[0].parent), "trace": None, "host_memory": None,
            "device": "cpu", "capacity": config.capacity, "variant": config.variant, "tokens": tokens, "warmup": 2,
            "threads": threads}
    root = Path(__file__).resolve().parent.parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=str(threads))
    done = run_limited([sys.executable, decode.__file__, "--child", json.dumps(spec)], config.limit, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": done.error(tail=2), "peak_bytes": done.peak_bytes}
    result = json.loads(lines[-1])
    result["peak_bytes"] = done.peak_bytes
    return result


def warm(files) -> None:
    """Read ``files`` through the page cache, so that a run "in RAM" finds them there."""
    buf = bytearray(16 * 2**20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run_rounds(configs: list[Config], *, repeats: int, run, progress=None) -> list[Runs]:
    """``repeats`` rounds of every configuration in turn (interleaved); ``run(config) -> dict``."""
    runs = [Runs(c) for c in configs]
    for round_ in range(repeats):
        for r in runs:
            r.results.append(run(r.config))
            if progress:
                progress(round_, r)
    return runs


def comparisons(runs: list[Runs]) -> list[dict]:
    """Ours against llama.cpp at the same precision and memory: each budget of ours in RAM beside llama.cpp in
    RAM (target 1.0x), ours in a cgroup beside llama.cpp in the same cgroup (target 2x)."""
    peers = {(r.config.pair, r.config.limit): r for r in runs if r.config.side == "llama.cpp"}
    rows = []
    for r in runs:
        if r.config.side != "ours":
            continue
        peer = peers.get((r.config.pair, r.config.limit))
        ours_s, peer_s = r.median(), peer.median() if peer else None
        target = TARGET_LIMITED if r.config.limit else TARGET_IN_RAM
        ratio = ours_s / peer_s if ours_s and peer_s else None
        rows.append({"precision": f"{r.config.precision} / {PAIRS[r.config.precision]}", "budget": r.config.budget,
                     "variant": r.config.variant, "limit": r.config.limit, "ours": r.summary(),
                     "llama.cpp": peer.summary() if peer else "-", "ratio": ratio, "target": target,
                     "met": None if ratio is None else ratio >= target})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| precision (ours / llama.cpp) | memory | our experts in slots | ours tok/s | llama.cpp tok/s "
             "| ours / llama.cpp | target | met |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        memory = f"cgroup {row['limit'] / 2**30:.2f} GiB" if row["limit"] else "all in RAM"
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        met = {True: "yes", False: "no", None: "-"}[row["met"]]
        lines.append(f"| {row['precision']} | {memory} | {row['budget']:.0%} ({row['variant']}) | {row['ours']} | "
                     f"{row['llama.cpp']} | {ratio} | {row['target']:.1f}x | {met} |")
    return "\n".join(lines)


def write_checkpoint(shape_kwargs: dict, layers: int, folder: Path) -> Path:
    """The bf16 synthetic checkpoint, per-expert layout with the hub's Mixtral names and a synthetic tokenizer
    (``synthetic.prepare``), which offload_moe and llama.cpp's converter both read."""
    import torch

    from benchmarks.peers.synthetic import prepare
    from offload_moe.synthetic import write_synthetic_checkpoint

    kwargs = dict(shape_kwargs)
    if kwargs.pop("model_type") != "mixtral":
        raise SystemExit("--peers llama.cpp: use a Mixtral shape (--shape mixtral or mini)")
    if not (folder / "config.json").exists():
        print(f"writing a checkpoint with {layers} layers to {folder} ...", file=sys.stderr)
        write_synthetic_checkpoint(folder, "mixtral", dtype=torch.bfloat16, num_hidden_layers=layers,
                                   max_position_embeddings=4096, tie_word_embeddings=False,
                                   shard_bytes=2 * 2**30, layout="per_expert", **kwargs)
    return prepare(folder)


def run(*, shape_kwargs: dict, layers: int, folder: Path, precisions: list[str], budgets: list[float],
        threads: int, tokens: int, repeats: int, limit_share: float | None, cache_dir: str | None = None,
        in_ram_variant: str = "full mmap", limited_variant: str = "full", json_path: str | None = None) -> dict:
    """Build llama.cpp (once), write and convert the checkpoint (once), run the rounds, print the table."""
    import offload_moe
    from benchmarks.decode import quantized_copy
    from benchmarks.peers import llama_cpp

    unknown = sorted(set(precisions) - set(PAIRS))
    if unknown:
        raise SystemExit(f"--peer-precisions: unknown {unknown}; use some of {', '.join(PAIRS)}")
    llama = llama_cpp.build(cache_dir)
    write_checkpoint(shape_kwargs, layers, folder)
    ours = {p: quantized_copy(folder, BITS.get(p)) for p in precisions}  # bf16: the folder itself
    gguf = {PAIRS[p]: llama_cpp.convert(llama, folder, PAIRS[p], threads=threads) for p in precisions}
    total = offload_moe.plan(folder, device_memory="1TiB").total_experts
    configs = plan_configs(ours, gguf, budgets=budgets, total_experts=total, in_ram_variant=in_ram_variant,
                           limited_variant=limited_variant, limit_share=limit_share)

    def progress(round_, r):
        print(f"round {round_ + 1}/{repeats}: {r.config.name}: {r.summary()}", file=sys.stderr)

    runs = run_rounds(configs, repeats=repeats,
                      run=lambda c: run_config(c, llama=llama, threads=threads, tokens=tokens), progress=progress)
    rows = comparisons(runs)
    report = {"llama_cpp": {"version": llama.version, "commit": llama.commit()}, "threads": threads,
              "tokens": tokens, "repeats": repeats, "limit_share": limit_share, "layers": layers,
              "checkpoint_bytes": {p: sum(f.stat().st_size for f in d.glob("*.safetensors")) for p, d in ours.items()},
              "gguf_bytes": {t: f.stat().st_size for t, f in gguf.items()}, "comparisons": rows,
              "runs": [{"config": r.config.name, "results": r.results} for r in runs]}
    print(f"\nllama.cpp {llama.commit()} (llama-cpp-python {llama.version}) beside offload_moe, {threads} threads, "
          f"{tokens} decode tokens, {repeats} interleaved rounds (median, range)\n")
    print(format_table(rows))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str))
    return report
