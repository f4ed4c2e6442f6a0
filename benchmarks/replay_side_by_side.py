"""The compiled replay engine now against itself at an earlier revision: same trace, alternating processes.

Issue 19's targets are rates on a shared machine, where one run's speed swings with the load; set side by
side, in rounds that alternate the two engines (each round a fresh process per engine, the best of
``--repeats`` replays of each row), the ratio holds still. Both engines replay the same synthetic top-8 /
128-expert / 48-layer trace (``replay_speed.SHAPE``) at 768 slots (12.5%) with what they work out once per
trace (``TraceArrays``) kept, and their counts are checked equal, row by row. Prints the median rate of each
engine over the rounds, their ratio and the load average; ``cpu`` rates count the process's CPU time (less
swayed by other jobs than the wall clock).

    OMP_NUM_THREADS=1 python benchmarks/replay_side_by_side.py --before 3c54f24 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay_speed import SHAPE, TARGETS, checkout  # noqa: E402

ROWS = ["lru/none", "lfu/none", "fifo/none", "random/none", "belady/none", "forecast/none", "lru/transition",
        "lfu/transition", "fifo/transition", "random/transition", "forecast/transition"]

# Run with one checkout's package first on the path: each row's best wall and CPU seconds, and its counts.
ONE = """
import json, sys, time
from offload_moe.profiling import compiled
from offload_moe.traces import synthesize_trace
tokens, capacity, repeats, shape, rows = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5].split(",")
compiled.compile_kernels()
small = compiled.TraceArrays(synthesize_trace(tokens=4, **shape))
arrays = compiled.TraceArrays(synthesize_trace(tokens=tokens, **shape))
out = {"requests": len(arrays.keys)}
for row in rows:
    policy, predictor = row.split("/")
    compiled.compiled_replay(small, policy, capacity, predictor, 1, 0)  # loaded from numba's cache
    compiled.compiled_replay(arrays, policy, capacity, predictor, 1, 0)  # guesses and next uses worked out
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        counts = compiled.compiled_replay(arrays, policy, capacity, predictor, 1, 0)
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    out[row] = {"wall": wall, "cpu": cpu, "counts": counts.tolist()}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="3c54f24", help="revision of the engine to set against this checkout's, "
                        "or a folder holding that revision's checkout (its numba cache kept between runs)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the synthetic trace (x 48 layers x top-8)")
    parser.add_argument("--capacity", type=int, default=768, help="slots (768: 12.5%% of the 6144 experts)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many replays of a row, per round")
    parser.add_argument("--rows", default=",".join(ROWS), help="policy/predictor, comma separated")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    here = Path(__file__).resolve().parents[1]
    command = [str(args.tokens), str(args.capacity), str(args.repeats), json.dumps(SHAPE), args.rows]
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    loads = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="replay-side-") as folder:
        old = Path(args.before) if Path(args.before).is_dir() else checkout(args.before, Path(folder))
        for _ in range(args.rounds):
            for name, root in (("before", old), ("after", here)):
                done = subprocess.run([sys.executable, "-c", ONE, *command], env={**env, "PYTHONPATH": str(root)},
                                      cwd=root, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(done.stdout))
            loads.append(os.getloadavg())
    requests = runs["after"][0]["requests"]
    print(f"trace: {args.tokens} tokens x 48 layers x top-8 of 128 experts ({requests:,} expert requests), "
          f"{args.capacity} slots; {args.rounds} rounds; load average (1 min) "
          f"{', '.join(f'{load[0]:.1f}' for load in loads)}")
    print("| policy | predictor | before (wall) | after (wall) | after / before | before (cpu) | after (cpu) | "
          "after / before (cpu) | target | same counts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for row in args.rows.split(","):
        rate = {(name, kind): statistics.median(requests / run[row][kind] for run in runs[name])
                for name in runs for kind in ("wall", "cpu")}
        same = all(run[row]["counts"] == runs["after"][0][row]["counts"] for name in runs for run in runs[name])
        policy, predictor = row.split("/")
        target = 2e6 if predictor == "transition" else TARGETS.get(policy)
        rows.append({"row": row, "rates": {f"{n}_{k}": v for (n, k), v in rate.items()}, "same_counts": same})
        print(f"| {policy} | {predictor} | {rate['before', 'wall'] / 1e6:.2f} M/s | {rate['after', 'wall'] / 1e6:.2f} M/s "
              f"| {rate['after', 'wall'] / rate['before', 'wall']:.2f}x | {rate['before', 'cpu'] / 1e6:.2f} M/s | "
              f"{rate['after', 'cpu'] / 1e6:.2f} M/s | {rate['after', 'cpu'] / rate['before', 'cpu']:.2f}x | "
              f"{'-' if target is None else f'{target / 1e6:.0f} M/s'} | {'yes' if same else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "runs": runs, "load_average": loads, "args": vars(args)},
                                              indent=2))


if __name__ == "__main__":
    main()
