"""Replaying a trace file in pieces against reading it whole: peak memory growth and time, side by side.

Issue 19, part 2: a trace larger than a memory bound is read and replayed in pieces of ``--chunk-tokens`` rows,
with the counts of the whole trace. A synthetic trace shaped like Qwen3-30B-A3B (48 layers, top-8 of 128
experts, skew 1.2, locality 0.3) of ``--tokens`` tokens is written to a temporary file; each policy is then
replayed on the fast engine (numba) twice, each time in a fresh process (so that one run's memory does not
hide the next's):

- whole: ``load_trace`` and ``replay(trace, ...)``, which works out the requests as arrays for the whole trace;
- pieces: ``replay(path, ..., chunk_tokens=N)``: a pass over the pieces for the largest expert id (backwards,
  writing the next uses to a temporary file, for Belady), then the replay, one piece at a time.

Memory: the process's peak resident set during the replay (sampled every 5 ms by a thread; the kernels
release the GIL) less its resident set just before, once the kernels are compiled and loaded (``ru_maxrss``
would count numba's compilation). Time: the wall time of the replay, reading the file included. The two
results are checked equal.

    python benchmarks/chunked_replay.py --tokens 98304 --chunk-tokens 4096 16384 --json benchmarks/results/chunked_replay.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

SHAPE = (48, 128, 8)  # layers, experts, top_k
JOBS = [("lru", "none"), ("lfu", "none"), ("belady", "none"), ("lru", "transition")]

CHILD = """
import json, sys, threading, time
import psutil
from offload_moe.profiling import replay
from offload_moe.traces import TraceFile, load_trace
path, how, policy, predictor, capacity, chunk = sys.argv[1:7]
capacity, chunk = int(capacity), int(chunk)
replay(TraceFile.open(path).first(64), policy, capacity, predictor=predictor, engine="fast")  # compile, load
process = psutil.Process()
before = process.memory_info().rss
peak, stop = [before], threading.Event()
def watch():
    while not stop.wait(0.005):
        peak[0] = max(peak[0], process.memory_info().rss)
watcher = threading.Thread(target=watch)
watcher.start()
start = time.perf_counter()
if how == "whole":
    result = replay(load_trace(path), policy, capacity, predictor=predictor, engine="fast")
else:
    result = replay(path, policy, capacity, predictor=predictor, engine="fast", chunk_tokens=chunk)
seconds = time.perf_counter() - start
stop.set()
watcher.join()
print(json.dumps({"seconds": seconds, "grown": max(peak[0], process.memory_info().rss) - before, "rss_before": before,
                  "result": [result.hits, result.misses, result.evictions, result.prefetch_issued, result.prefetch_used]}))
"""

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=98304)
    parser.add_argument("--chunk-tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from offload_moe.traces import save_trace, synthesize_trace

    layers, experts, top_k = SHAPE
    capacity = layers * experts // 4  # 25% of the experts
    ways = ["whole", *(f"pieces of {n}" for n in args.chunk_tokens)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="chunked-replay-") as folder:
        trace = synthesize_trace(tokens=args.tokens, layers=layers, num_experts=experts, top_k=top_k, skew=1.2,
                                 locality=0.3, seed=0)
        path = save_trace(trace, Path(folder) / "trace.safetensors")
        del trace
        size = path.stat().st_size
        for policy, predictor in JOBS:
            runs = {"whole": _child(path, "whole", policy, predictor, capacity, 0)}
            for n in args.chunk_tokens:
                runs[f"pieces of {n}"] = _child(path, "pieces", policy, predictor, capacity, n)
            for way, run in runs.items():
                if run["result"] != runs["whole"]["result"]:
                    raise SystemExit(f"{policy}/{predictor}: the replay in {way} counted {run['result']}, "
                                     f"the whole trace {runs['whole']['result']}")
            rows.append({"policy": policy, "predictor": predictor, "runs": runs})
    requests = args.tokens * layers * top_k
    print(f"trace: {args.tokens} tokens x {layers} layers x top-{top_k} of {experts} ({requests:,} expert requests, "
          f"file {size / 2**20:.0f} MiB), capacity {capacity} (25%); load average {os.getloadavg()[0]:.2f}")
    print("| policy | predictor | " + " | ".join(f"{way}: peak growth, time" for way in ways) + " |")
    print("|---|---|" + "---|" * len(ways))
    for r in rows:
        whole = r["runs"]["whole"]["seconds"]
        cells = [f"{run['grown'] / 2**20:.0f} MiB, {run['seconds']:.1f} s"
                 + (f" ({run['seconds'] / whole:.2f}x)" if way != "whole" else "") for way, run in r["runs"].items()]
        print(f"| {r['policy']} | {r['predictor']} | " + " | ".join(cells) + " |")
    if args.json:
        from offload_moe.atomic import atomic_write

        document = {"tokens": args.tokens, "shape": SHAPE, "chunk_tokens": args.chunk_tokens, "file_bytes": size,
                    "capacity": capacity, "rows": rows, "machine": platform.platform(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
        atomic_write(args.json, json.dumps(document, indent=2).encode())


def _child(path: Path, how: str, policy: str, predictor: str, capacity: int, chunk: int) -> dict:
    ran = subprocess.run([sys.executable, "-c", CHILD, str(path), how, policy, predictor, str(capacity), str(chunk)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if ran.returncode != 0:
        raise SystemExit(f"{how} replay of {policy}/{predictor} failed:\n{ran.stderr}")
    return json.loads(ran.stdout.splitlines()[-1])


if __name__ == "__main__":
    main()
