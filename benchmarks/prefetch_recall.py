"""How well do the prefetch predictors guess the next layers' experts on a trained model? A benchmark.

Decodes held-out text token by token, teacher forced, through a model (default: the bundled demo
model, on the token ids stored in its reference trace) with each predictor, depth and margin, at a
budget of 25% of the experts, and reports:

- prediction recall: of the experts a layer needed, the share the predictor named one layer ahead;
- prediction precision: of the experts it named, the share that were needed;
- prefetch recall (the runtime's): needed experts already resident or in flight when needed;
- hit rate and loads per token.

Target (issue 3): prediction recall >= 0.9 one layer ahead.

    python benchmarks/prefetch_recall.py
    python benchmarks/prefetch_recall.py --model path/to/model --trace trace.safetensors --json out.json
    python benchmarks/prefetch_recall.py --policies     # LRU against LFU, with and without prefetch
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from offload_moe.generation import kv_cache_kwargs, kv_cache_of


def decode_run(model_path: Path, token_ids: torch.Tensor, sequences: list[tuple[int, int]], predictor: str, depth: int, margin: int, fraction: float,
               steps: int, policy: str = "lru") -> dict:
    """Token-by-token decoding of held-out text (teacher forced): the setting prefetch is for.

    Prefill is left out on purpose: a long prompt needs nearly every expert of every layer, so any
    prediction covers it and its recall says nothing.
    """
    import offload_moe

    plan = offload_moe.plan(model_path, device_memory="1TiB")
    capacity = max(2, round(fraction * plan.total_experts))
    model = offload_moe.load(model_path, cache_experts=capacity, prefetch=predictor, prefetch_depth=depth,
                             prefetch_margin=margin, policy=policy, dtype="float32", progress=False)
    with torch.inference_mode():
        for start, end in sequences:
            out = model(token_ids[start : start + 1].long().unsqueeze(0), use_cache=True)
            past = kv_cache_of(out)
            for t in range(start + 1, min(end, start + steps)):
                out = model(token_ids[t : t + 1].long().unsqueeze(0), **kv_cache_kwargs(model, past), use_cache=True)
                past = kv_cache_of(out)
    model.offload.cache.drain()
    s = model.offload.stats()
    model.offload.close()
    return {"policy": policy, "predictor": predictor, "depth": depth, "margin": margin, "capacity_experts": capacity,
            "prediction_recall": s["prediction_recall"], "prediction_precision": s["prediction_precision"],
            "prefetch_recall": s["prefetch_recall"], "hit_rate": s["hit_rate"],
            "loads_per_token": s["bytes_loaded"] / s["expert_bytes"] / max(s["tokens"], 1), "tokens": s["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the bundled demo model)")
    parser.add_argument("--trace", default="profiles/traces/demo-heldout.safetensors",
                        help="trace whose token_ids are the held-out text")
    parser.add_argument("--fraction", type=float, default=0.25, help="share of experts resident")
    parser.add_argument("--steps", type=int, default=128, help="decode steps per held-out sequence")
    parser.add_argument("--policies", action="store_true",
                        help="instead compare eviction policies: lru and lfu, without prefetch and with transition or hybrid")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import offload_moe
    from offload_moe.traces import load_trace

    model_path = Path(args.model) if args.model else offload_moe.demo_model_path()
    trace = load_trace(args.trace)
    if trace.token_ids is None:
        raise SystemExit(f"{args.trace} stores no token_ids; record it with them")
    rows = []
    settings = [("lru", "none", 1, 0), ("lru", "gate", 1, 0), ("lru", "gate", 1, 1), ("lru", "gate", 1, 2),
                ("lru", "gate", 2, 1), ("lru", "transition", 1, 0), ("lru", "transition", 1, 1),
                ("lru", "transition", 1, 2), ("lru", "transition", 2, 1), ("lru", "hybrid", 1, 0),
                ("lru", "hybrid", 1, 1), ("lru", "hybrid", 2, 1)]
    if args.policies:
        settings = [("lru", "none", 1, 0), ("lfu", "none", 1, 0), ("lru", "transition", 1, 1),
                    ("lfu", "transition", 1, 1), ("lfu", "hybrid", 1, 1)]
    for policy, predictor, depth, margin in settings:
        rows.append(decode_run(model_path, trace.token_ids, trace.sequences(), predictor, depth, margin,
                               args.fraction, args.steps, policy))
    print("| policy | predictor | depth | margin | prediction recall | prediction precision | prefetch recall | hit rate | loads/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['predictor']} | {r['depth']} | {r['margin']} | {r['prediction_recall']:.3f} | "
              f"{r['prediction_precision']:.3f} | {r['prefetch_recall']:.3f} | {r['hit_rate']:.3f} | {r['loads_per_token']:.2f} |")
    if args.json:
        report = {"model": str(model_path), "trace": args.trace, "rows": rows,
                  "machine": {"platform": platform.platform(), "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d")}}
        from offload_moe.atomic import atomic_write

        atomic_write(args.json, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
