"""How long does cache-policy profiling take on a trace of about 100k token-layer accesses? A benchmark.

Target (issue 4): profiling a trace of 100k token-layer accesses takes seconds, not minutes.
Two synthetic traces of that size (``offload_moe.traces.synthesize_trace``, skew 1.2, locality
0.3), one with top-2 routing (4096 tokens x 24 layers, top-2 of 64 experts) and one shaped like
Qwen3-30B-A3B (2048 tokens x 48 layers, top-8 of 128 experts), go
through the default sweep of ``offload-moe profile``: lru, lfu, fifo, random at 12.5%, 25% and
50% of the experts, each without prefetch and with ``transition``, plus Belady at each capacity
(27 replays). It is timed in one process and spread over one process per CPU, side by side.

    python benchmarks/profile_speed.py --json benchmarks/results/profile_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

SHAPES = {  # name: (tokens, layers, experts, top_k)
    "top-2 of 64": (4096, 24, 64, 2),
    "qwen3-30b-a3b-like": (2048, 48, 128, 8),
}
POLICIES = ["lru", "lfu", "fifo", "random"]
PREDICTORS = ["none", "transition"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from offload_moe.profiling import parse_capacities, sweep
    from offload_moe.traces import synthesize_trace

    cpus = len(os.sched_getaffinity(0))
    rows = []
    for name, (tokens, layers, experts, top_k) in SHAPES.items():
        trace = synthesize_trace(tokens=tokens, layers=layers, num_experts=experts, top_k=top_k, skew=1.2, locality=0.3)
        capacities = parse_capacities("12.5%,25%,50%", layers * experts)
        timings = {}
        for workers in (1, cpus):
            start = time.perf_counter()
            results = sweep(trace, policies=POLICIES, capacities=capacities, predictors=PREDICTORS, workers=workers)
            timings[workers] = time.perf_counter() - start
        rows.append({"trace": name, "tokens": tokens, "layers": layers, "experts": experts, "top_k": top_k,
                     "accesses": tokens * layers, "expert_requests": tokens * layers * top_k,
                     "replays": len(results), "seconds_1_process": timings[1], "processes": cpus,
                     "seconds_all_processes": timings[cpus]})
    print(f"| trace | token-layer accesses | expert requests | replays | 1 process | {cpus} processes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trace']} | {r['accesses']:,} | {r['expert_requests']:,} | {r['replays']} | "
              f"{r['seconds_1_process']:.1f} s | {r['seconds_all_processes']:.1f} s |")
    if args.json:
        from offload_moe.atomic import atomic_write

        report = {"rows": rows, "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                            "torch": torch.__version__, "cpus": cpus,
                                            "date": time.strftime("%Y-%m-%d")}}
        atomic_write(args.json, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
