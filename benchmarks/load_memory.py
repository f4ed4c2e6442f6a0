"""How much host memory does loading cost? A benchmark, not a test.

Writes a Mixtral-shaped random checkpoint (about 1.5 GB by default), then loads it
on CPU with 25% of its experts as the budget in a fresh child process. The child
reports how much its resident memory grew during the load (peak minus the figure
just before), next to the dense weights, the budget and the checkpoint size.

Target: growth <= dense weights + budget + 10% of the checkpoint.

    python benchmarks/load_memory.py                  # ~1.5 GB checkpoint
    python benchmarks/load_memory.py --size small     # ~40 MB, what the test suite runs
    python benchmarks/load_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # Mixtral's shape (intermediate = 3.5 x hidden, 8 experts, top-2) scaled to fit a CI machine.
    "large": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
    "small": dict(vocab_size=4000, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
}


def peak_rss() -> int:
    """This process's peak resident memory. VmHWM belongs to the process image, unlike ru_maxrss,
    which a child started with fork+exec inherits from its parent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def child(folder: str, fraction: float) -> dict:
    """Runs in a fresh process: measure the load alone."""
    import psutil
    import torch

    import offload_moe
    from offload_moe.loader import build_skeleton, checkpoint_renamer, load_config, swap_experts

    # Import everything the load imports before measuring (first imports compile and allocate);
    # the skeleton holds no weights.
    skeleton = build_skeleton(load_config(Path(folder)))
    total_experts = sum(m.num_experts for m in swap_experts(skeleton))
    checkpoint_renamer(skeleton)
    del skeleton
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    model = offload_moe.load(folder, device="cpu", cache_experts=max(2, int(total_experts * fraction)), progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    stats = model.offload.stats()
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "rss_before": before,
        "rss_peak": peak,
        "growth": peak - before,
        "dense_bytes": dense,
        "budget_bytes": stats["resident_bytes"],
        "capacity_experts": stats["capacity_experts"],
        "total_experts": stats["total_experts"],
        "load_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--fraction", type=float, default=0.25, help="share of experts in the budget")
    parser.add_argument("--folder", help="reuse (or keep) the checkpoint here instead of a temp folder")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.fraction)))
        return

    import torch

    from offload_moe.synthetic import write_synthetic_checkpoint

    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        folder = Path(args.folder or Path(tmp) / "model")
        if not (folder / "config.json").exists():
            print(f"writing a {args.size} Mixtral-shaped checkpoint to {folder} ...", file=sys.stderr)
            write_synthetic_checkpoint(folder, "mixtral", dtype=torch.bfloat16, **SIZES[args.size])
        checkpoint = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--fraction", str(args.fraction)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    result["checkpoint_bytes"] = checkpoint
    result["target_bytes"] = result["dense_bytes"] + result["budget_bytes"] + checkpoint // 10
    result["met"] = result["growth"] <= result["target_bytes"]
    result["size"] = args.size
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                         "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    mib = 2**20
    print("| checkpoint | dense | budget (experts) | RSS growth | target | met |")
    print("|---|---|---|---|---|---|")
    print(f"| {checkpoint / mib:.0f} MiB | {result['dense_bytes'] / mib:.0f} MiB | {result['budget_bytes'] / mib:.0f} MiB "
          f"({result['capacity_experts']}/{result['total_experts']}) | {result['growth'] / mib:.0f} MiB | "
          f"{result['target_bytes'] / mib:.0f} MiB | {'yes' if result['met'] else 'NO'} |")
    if args.json:
        from offload_moe.atomic import atomic_write

        atomic_write(args.json, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
