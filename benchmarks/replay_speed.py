"""How many expert requests per second does a replay count? The compiled engine beside the engines before it.

Target (issue 19): at least 20 million expert requests per second per core for lru, lfu and fifo, 10
million for belady, 2 million with the transition predictor, on a synthetic top-8 / 128-expert /
48-layer trace (``offload_moe.traces.synthesize_trace``, skew 1.2, locality 0.3).

Side by side, in one run, one process, one core (OMP_NUM_THREADS=1):

- ``fast``: ``replay(engine="fast")``, the compiled engine (numba), with what it works out once per trace
  (``TraceArrays``) kept, as a sweep keeps it; the ``transition`` rows also with the guesses worked out
  inside the timing (``fast, guesses included``), as a single replay pays them;
- ``before``: the engine ``replay(engine="fast")`` was before it (a Python loop over ``Residency``), run from
  a checkout of the revision given with ``--before`` (default: the commit before the compiled engine), with its
  groups and predictions kept as its sweeps kept them; its counts are checked equal to the new engine's;
- ``reference``: ``replay(engine="reference")``, the runtime's own cache with a null mover, on the first
  ``--reference-tokens`` tokens (it is slow); ``fast / reference`` sets it against the fast engine on the same
  tokens (``fast, reference's tokens``), since a policy's cost per request can change as the trace goes on
  (``forecast`` scores every expert its layer has seen at each visit).

``forecast`` had no compiled form before: ``engine="fast"`` replayed it with the reference, so its
``reference`` column is what its replays cost until then (``before`` has no forecast).

    python benchmarks/replay_speed.py --json benchmarks/results/replay_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

POLICIES = ["lru", "lfu", "fifo", "random", "belady", "forecast"]
TARGETS = {"lru": 20e6, "lfu": 20e6, "fifo": 20e6, "belady": 10e6}  # requests/s; with transition: 2e6
SHAPE = dict(layers=48, num_experts=128, top_k=8, skew=1.2, locality=0.3, seed=0)

# Run in a checkout of the old revision: the same trace, its fast engine, counts and seconds as JSON.
BEFORE = """
import json, sys, time
from offload_moe.profiling import layer_groups, predictions, replay
from offload_moe.traces import synthesize_trace
tokens, capacity, repeats, shape = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
trace = synthesize_trace(tokens=tokens, **shape)
groups = layer_groups(trace)
out = {}
start = time.perf_counter()
named = {"none": None, "transition": predictions(trace, "transition", 1)}
out["guesses_seconds"] = time.perf_counter() - start
for policy in ["lru", "lfu", "fifo", "random", "belady"]:
    for predictor in ["none"] if policy == "belady" else ["none", "transition"]:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            r = replay(trace, policy, capacity, predictor=predictor, engine="fast", groups=groups, predicted=named[predictor])
            best = min(best, time.perf_counter() - start)
        out[policy + "/" + predictor] = {"seconds": best, "requests": r.requests, "hits": r.hits, "misses": r.misses,
                                         "prefetch_issued": r.prefetch_issued}
print(json.dumps(out))
"""


def best_of(repeats: int, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def checkout(revision: str, folder: Path) -> Path:
    """The package as it was at ``revision`` (git archive), unpacked into ``folder``."""
    archive = folder / "before.tar"
    root = Path(__file__).resolve().parents[1]
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(root), "archive", revision, "offload_moe", "profiles"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the synthetic trace (x 48 layers x top-8)")
    parser.add_argument("--capacity", type=float, default=0.125, help="slots, as a share of the 6144 experts")
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many runs of each replay")
    parser.add_argument("--reference-tokens", type=int, default=128, help="tokens the reference engine replays")
    parser.add_argument("--before", default="45873d6", help="revision of the engine to compare with ('' to skip)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import numba
    import numpy
    import torch

    from offload_moe.profiling import replay
    from offload_moe.profiling.compiled import TraceArrays, compile_kernels
    from offload_moe.traces import synthesize_trace

    compile_kernels()
    TraceArrays(synthesize_trace(tokens=2, **SHAPE)).guesses("transition", 1)  # compiled (or loaded) before timing
    trace = synthesize_trace(tokens=args.tokens, **SHAPE)
    capacity = int(args.capacity * SHAPE["layers"] * SHAPE["num_experts"])
    arrays = TraceArrays(trace)
    start = time.perf_counter()
    arrays.guesses("transition", 1)
    guesses_seconds = time.perf_counter() - start
    short = trace.first(args.reference_tokens)
    short_arrays = TraceArrays(short)
    short_arrays.guesses("transition", 1)
    load_before = os.getloadavg()

    before = {}
    if args.before:
        with tempfile.TemporaryDirectory(prefix="replay-speed-") as folder:
            old = checkout(args.before, Path(folder))
            env = {**os.environ, "PYTHONPATH": str(old)}
            done = subprocess.run([sys.executable, "-c", BEFORE, str(args.tokens), str(capacity), str(args.repeats),
                                   json.dumps(SHAPE)], env=env, cwd=old, capture_output=True, text=True, check=True)
            before = json.loads(done.stdout)

    rows = []
    for policy in POLICIES:
        for predictor in ["none"] if policy == "belady" else ["none", "transition"]:
            replay(trace, policy, capacity, predictor=predictor, engine="fast", arrays=arrays)  # compiled, warm
            seconds, result = best_of(args.repeats, lambda: replay(trace, policy, capacity, predictor=predictor,
                                                                   engine="fast", arrays=arrays))
            row = {"policy": policy, "predictor": predictor, "requests": result.requests, "hit_rate": result.hit_rate,
                   "fast": result.requests / seconds}
            if predictor == "transition":
                row["fast_guesses_included"] = result.requests / (seconds + guesses_seconds)
            old = before.get(f"{policy}/{predictor}")
            if old is not None:
                row["before"] = old["requests"] / old["seconds"]
                row["same_counts_as_before"] = (old["hits"], old["misses"], old["prefetch_issued"]) == (
                    result.hits, result.misses, result.prefetch_issued)
            ref_seconds, ref = best_of(1, lambda: replay(short, policy, capacity, predictor=predictor))
            row["reference"] = ref.requests / ref_seconds
            short_seconds, short_result = best_of(args.repeats, lambda: replay(
                short, policy, capacity, predictor=predictor, engine="fast", arrays=short_arrays))
            row["fast_reference_tokens"] = short_result.requests / short_seconds
            row["same_counts_as_reference"] = ref == short_result
            rows.append(row)
    load_after = os.getloadavg()

    def rate(value):
        if value is None:
            return "-"
        return f"{value / 1e6:.2f} M/s" if value >= 1e5 else f"{value / 1e3:.1f} k/s"

    print(f"trace: {args.tokens} tokens x 48 layers x top-8 of 128 experts ({rows[0]['requests']:,} expert requests), "
          f"capacity {capacity} slots; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
          f"{os.cpu_count()} CPUs")
    print("| policy | predictor | fast | fast, guesses included | before | reference | fast, reference's tokens | "
          "fast / before | fast / reference | target | hit rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = 2e6 if r["predictor"] == "transition" else TARGETS.get(r["policy"])
        over_before = f"{r['fast'] / r['before']:.0f}x" if "before" in r else "-"
        print(f"| {r['policy']} | {r['predictor']} | {rate(r['fast'])} | {rate(r.get('fast_guesses_included'))} | "
              f"{rate(r.get('before'))} | {rate(r['reference'])} | {rate(r['fast_reference_tokens'])} | {over_before} | "
              f"{r['fast_reference_tokens'] / r['reference']:.0f}x | {rate(target)} | {r['hit_rate']:.3f} |")
    differ = [f"{r['policy']}/{r['predictor']}" for r in rows
              if not r["same_counts_as_reference"] or not r.get("same_counts_as_before", True)]
    print("counts: " + (f"DIFFER for {', '.join(differ)}" if differ else "equal to the reference's (first tokens) in "
                        "every row, and to the engine before's (hits, misses, prefetches issued) in every row it has"))
    print(f"transition guesses worked out once: {guesses_seconds:.2f} s (compiled) against "
          f"{before.get('guesses_seconds', float('nan')):.2f} s (before, numpy)")
    if args.json:
        from offload_moe.atomic import atomic_write

        report = {"rows": rows, "tokens": args.tokens, "capacity": capacity, "shape": SHAPE,
                  "reference_tokens": args.reference_tokens, "before_revision": args.before,
                  "guesses_seconds": {"fast": guesses_seconds, "before": before.get("guesses_seconds")},
                  "load_average": {"before": load_before, "after": load_after},
                  "machine": {"platform": platform.platform(), "python": platform.python_version(),
                              "numpy": numpy.__version__, "numba": numba.__version__, "torch": torch.__version__,
                              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}}
        atomic_write(args.json, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
