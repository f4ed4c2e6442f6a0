"""A sweep on a local Ray against the same sweep in one process: same results, and the wall time of each.

Target (issue 19): a sweep of 4 policies x 8 capacities x 2 predictors (plus Belady at each capacity: 72
replays) on a trace of 10 million expert requests, run on a local Ray with 2 workers, gives the same results
as the local sweep. The trace is synthetic and shaped like Qwen3-30B-A3B (48 layers, top-8 of 128 experts:
384 requests a token, 26,042 tokens). Ray's start and stop are timed apart from the sweep on it.

    python benchmarks/cluster_sweep.py --json benchmarks/results/cluster_sweep.json
    python benchmarks/cluster_sweep.py --requests 1000000   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import platform
import time

POLICIES = ["lru", "lfu", "fifo", "random"]
PREDICTORS = ["none", "transition"]
CAPACITIES = "5%,10%,12.5%,15%,20%,25%,37.5%,50%"
LAYERS, EXPERTS, TOP_K = 48, 128, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000_000, help="expert requests in the trace")
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import numpy
    import ray
    import torch

    from offload_moe.profiling import parse_capacities, sweep, sweep_size
    from offload_moe.traces import synthesize_trace

    tokens = -(-args.requests // (LAYERS * TOP_K))
    trace = synthesize_trace(tokens=tokens, layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K, skew=1.2, locality=0.3,
                             sequences=64, seed=0)
    capacities = parse_capacities(CAPACITIES, LAYERS * EXPERTS)
    grid = {"policies": POLICIES, "capacities": capacities, "predictors": PREDICTORS}
    replays = sweep_size(POLICIES, capacities, PREDICTORS)
    requests = trace.experts.numel()
    print(f"trace: {tokens} tokens x {LAYERS} layers x top-{TOP_K} of {EXPERTS} = {requests:,} expert requests; "
          f"{replays} replays", flush=True)

    start = time.perf_counter()
    local = sweep(trace, **grid, workers=1)
    one_process = time.perf_counter() - start
    print(f"one process: {one_process:.1f} s", flush=True)

    start = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - start
    try:
        start = time.perf_counter()
        on_ray = sweep(trace, **grid, ray=True)
        ray_sweep = time.perf_counter() - start
    finally:
        start = time.perf_counter()
        ray.shutdown()
        ray_stop = time.perf_counter() - start
    same = [r.as_dict() for r in on_ray] == [r.as_dict() for r in local]
    print(f"local Ray ({args.workers} CPUs): start {ray_start:.1f} s, sweep {ray_sweep:.1f} s, stop {ray_stop:.1f} s; "
          f"results {'identical' if same else 'DIFFERENT'}", flush=True)
    print(f"Ray, start to stop, against one process: {(ray_start + ray_sweep + ray_stop) / one_process:.2f}x the time; "
          f"the sweep alone {ray_sweep / one_process:.2f}x")
    if args.json:
        document = {
            "trace": {"tokens": tokens, "layers": LAYERS, "experts": EXPERTS, "top_k": TOP_K, "requests": requests},
            "replays": replays, "one_process_s": one_process, "ray_start_s": ray_start, "ray_sweep_s": ray_sweep,
            "ray_stop_s": ray_stop, "ray_cpus": args.workers, "identical": same,
            "machine": {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                        "ray": ray.__version__, "platform": platform.platform()},
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
    if not same:
        raise SystemExit("the sweep on Ray gave different results")


if __name__ == "__main__":
    main()
