"""Long-run soak: thousands of decode steps at 2 expert slots per layer; nothing may grow. A benchmark.

Every ``--every`` steps it samples host RSS, device memory (CUDA), pinned bytes held by
the runtime, open file descriptors and threads. The KV cache is restarted at each sample,
so a healthy run is flat: after the first ``--warmup`` samples, every figure must stay
within 5% of the warm-up level (file descriptors and threads: exactly equal).

    python benchmarks/soak.py                      # 5,000 steps
    python benchmarks/soak.py --steps 300 --json out.json   # what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from offload_moe.generation import kv_cache_kwargs, kv_cache_of

CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
              tie_word_embeddings=False)
TOLERANCE = 0.05


def pinned_bytes(model) -> int:
    cache = model.offload.cache
    total = sum(b.numel() for b in getattr(cache.mover, "_stagings", []))
    if cache.host is not None and cache.host.pool.buffer.is_pinned():
        total += cache.host.pool.nbytes
    return total


def sample(model, device: str, step: int) -> dict:
    proc = psutil.Process()
    out = {"step": step, "rss": proc.memory_info().rss, "fds": proc.num_fds(), "threads": threading.active_count(),
           "pinned": pinned_bytes(model)}
    if device.startswith("cuda"):
        out["device_memory"] = torch.cuda.memory_allocated()
    return out


def soak(folder: Path, device: str, steps: int, every: int, prefetch: str, host_memory) -> list[dict]:
    import offload_moe

    layers = CONFIG["num_hidden_layers"]
    model = offload_moe.load(folder, device=device, cache_experts=2 * layers, prefetch=prefetch,
                             host_memory=host_memory, progress=False)
    prompt = torch.arange(1, 9, device=device).unsqueeze(0)
    samples = []
    with torch.inference_mode():
        past = nxt = None
        for step in range(steps + 1):
            if step % every == 0:
                if step:
                    samples.append(sample(model, device, step))
                out = model(prompt, use_cache=True)  # restart the KV cache: memory is comparable between samples
            else:
                out = model(nxt, **kv_cache_kwargs(model, past), use_cache=True)
            past, nxt = kv_cache_of(out), out.logits[:, -1:].argmax(-1)
    stats = model.offload.stats()
    model.offload.close()
    samples[-1]["misses"] = stats["misses"]
    return samples


def judge(samples: list[dict], warmup: int) -> dict:
    base = samples[min(warmup, len(samples) - 1) - 1] if warmup else samples[0]
    later = samples[warmup:] or samples[-1:]
    verdict = {}
    for key in ("rss", "pinned", "device_memory"):
        if key in base:
            worst = max(abs(s[key] - base[key]) / max(base[key], 1) for s in later)
            verdict[key] = {"base": base[key], "worst_change": worst, "flat": worst <= TOLERANCE}
    for key in ("fds", "threads"):
        verdict[key] = {"base": base[key], "worst_change": max(abs(s[key] - base[key]) for s in later),
                        "flat": all(s[key] == base[key] for s in later)}
    verdict["flat"] = all(v["flat"] for v in verdict.values() if isinstance(v, dict))
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=2, help="samples before the level is taken")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prefetch", default="gate")
    parser.add_argument("--host-memory", default=None, help="add a warm tier (pinned on CUDA)")
    parser.add_argument("--json", help="write samples and verdict here")
    args = parser.parse_args()

    from offload_moe.synthetic import write_synthetic_checkpoint

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        folder = write_synthetic_checkpoint(Path(tmp) / "model", "mixtral", seed=0, **CONFIG)
        start = time.perf_counter()
        samples = soak(folder, args.device, args.steps, args.every, args.prefetch, args.host_memory)
        seconds = time.perf_counter() - start
    verdict = judge(samples, args.warmup)
    print("| step | RSS MiB | pinned MiB | fds | threads |" + (" device MiB |" if "device_memory" in samples[0] else ""))
    print("|---|---|---|---|---|" + ("---|" if "device_memory" in samples[0] else ""))
    for s in samples:
        row = f"| {s['step']} | {s['rss'] / 2**20:.1f} | {s['pinned'] / 2**20:.1f} | {s['fds']} | {s['threads']} |"
        print(row + (f" {s['device_memory'] / 2**20:.1f} |" if "device_memory" in s else ""))
    print(f"\n{args.steps} steps in {seconds:.1f} s; flat: {verdict['flat']} "
          f"(RSS worst change {verdict['rss']['worst_change']:.1%})", file=sys.stderr)
    if args.json:
        report = {"steps": args.steps, "seconds": seconds, "samples": samples, "verdict": verdict,
                  "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                              "date": time.strftime("%Y-%m-%d")}}
        from offload_moe.atomic import atomic_write

        atomic_write(args.json, json.dumps(report, indent=2).encode())
    sys.exit(0 if verdict["flat"] else 1)


if __name__ == "__main__":
    main()
