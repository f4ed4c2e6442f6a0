"""Decode speed on a busy machine, by compute threads: what ``offload-moe --threads N`` is for. A benchmark, not a test.

torch runs each matrix product on a pool of OpenMP threads (one per core by default) and waits for the slowest at
the end. When other programs keep the cores busy, the scheduler puts one of those threads aside now and then, and
every product of the step waits for it. This script starts ``--busy`` processes that spin (the other programs),
then runs ``offload-moe generate`` on the bundled model with each thread count in ``--threads``, interleaved,
``--rounds`` times, each in its own process, and prints tokens/s per thread count (median and range), with and
without the busy processes. Writes JSON with ``--json``.

    python benchmarks/busy_threads.py --busy 0,8 --threads 1,2 --rounds 3 --json busy_threads.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def spin() -> None:
    while True:
        pass


def generate(threads: int, tokens: int, io: str) -> float:
    """tokens/s of one ``offload-moe generate`` run with ``threads`` compute threads, in a new process."""
    command = [sys.executable, "-m", "offload_moe", "--threads", str(threads), "generate", "--prompt", "def fib(n):",
               "--max-new-tokens", str(tokens), "--io", io, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        sys.exit(f"generate with {threads} thread(s) failed:\n{done.stderr}")
    return json.loads(done.stdout)["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", default="0,8", help="comma-separated: spinning processes to run beside")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated compute thread counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--io", default="direct")
    parser.add_argument("--json")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
              "tokens": args.tokens, "io": args.io, "rows": []}
    for busy in [int(b) for b in args.busy.split(",")]:
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            speeds: dict[int, list[float]] = {t: [] for t in threads}
            for _ in range(args.rounds):
                for t in threads:
                    speeds[t].append(generate(t, args.tokens, args.io))
            load = os.getloadavg()[0]
        finally:
            for p in spinners:
                p.terminate()
                p.join()
        report["rows"].append({"busy": busy, "load_average": load, "tokens_per_s": speeds})
    print(f"\nbundled model, {args.tokens} tokens, io={args.io}, {report['machine']['cores']} cores, "
          f"torch {torch.__version__}, {report['machine']['date']}; tokens/s, median (range) of {args.rounds}\n")
    print("| busy processes | load | " + " | ".join(f"{t} thread(s)" for t in threads) + " |")
    print("|---|---|" + "---|" * len(threads))
    for row in report["rows"]:
        cells = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in row["tokens_per_s"].values()]
        print(f"| {row['busy']} | {row['load_average']:.1f} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
