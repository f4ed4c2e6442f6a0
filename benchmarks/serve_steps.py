"""What batched decoding asks of the expert cache, counted: for batches of 1, 2, 4 and 8 requests, the experts
each step needs (per layer and in all), and the loads per generated token each eviction policy pays for those
steps, with the cache's rule for steps of several tokens off (as before it) and on. Counts, not timings: the
steps are recorded once from the serving engine, then replayed through caches of zero-byte slots.

    python benchmarks/serve_steps.py                                  # the bundled model, 25% of its experts
    python benchmarks/serve_steps.py --synthetic mini --layers 2      # the Mixtral-shaped synthetic checkpoint
    python benchmarks/serve_steps.py --resident 0.25,0.5 --json steps.json

Each batch size decodes the same 8 prompts (``serve.py``'s) for ``--tokens`` greedy tokens each, with at most
that many requests in the batch, all queued before the first step. The routing does not depend on the cache,
so one recording serves every policy; ``belady`` (the fewest misses any policy could have, knowing the future)
is the bound. ``floor`` is the fewest loads per token that any cache of that many slots pays for these steps,
whatever it keeps: a step that asks for ``n`` experts finds at most ``slots`` of them resident.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from decode import SHAPES, expert_capacity  # noqa: E402
from serve import PROMPTS, served_checkpoint, total_experts  # noqa: E402

from offload_moe.cache import ExpertCache, Residency, SlotLayout, SlotPool  # noqa: E402
from offload_moe.generation import load_with_tokenizer  # noqa: E402
from offload_moe.policies import make_policy  # noqa: E402
from offload_moe.profiling.replays import _NoFiles  # noqa: E402
from offload_moe.serve import Engine, Params  # noqa: E402
from offload_moe.transfer import NullMover  # noqa: E402

Call = tuple[int, list[int], int]  # (layer, distinct experts, tokens of the step)


@dataclass
class Step:
    kind: str  # "prefill" or "decode"
    calls: list[Call] = field(default_factory=list)

    @property
    def asked(self) -> int:
        """Experts asked for, all layers together."""
        return sum(len(experts) for _, experts, _ in self.calls)


def record(model, tokenizer, batch: int, tokens: int) -> tuple[list[Step], int]:
    """The cache calls of decoding ``PROMPTS`` with at most ``batch`` requests together, grouped by step, and the
    tokens generated."""
    cache = model.offload.cache
    steps: list[Step] = []
    first = min(cache.layer_names)
    use = cache.use
    kind = ["prefill"]

    def recorded(layer, experts, *, tokens=1):
        if layer == first or not steps:
            steps.append(Step(kind[0]))
        steps[-1].calls.append((layer, list(experts), tokens))
        return use(layer, experts, tokens=tokens)

    cache.use = recorded
    engine = Engine(model, tokenizer, max_batch=batch, close_model=False)
    for name in ("_prefill", "_decode"):  # the engine's two kinds of step, marked for the recorder
        method = getattr(engine, name)

        def marked(*args, _method=method, _kind=name[1:]):
            kind[0] = _kind
            return _method(*args)

        setattr(engine, name, marked)
    try:
        with engine._wake:  # the engine waits on this lock: every prompt is queued before its first step
            jobs = [engine.submit(p, Params(max_tokens=tokens)) for p in PROMPTS]
        generated = sum(job.result().completion_tokens for job in jobs)
    finally:
        engine.shutdown(timeout=0)
        cache.use = use
    return steps, generated


def replay(steps: list[Step], policy: str, slots: int, rule: bool) -> int:
    """Misses of the recorded steps through a cache of ``slots`` zero-byte slots under ``policy``."""
    calls = [call for step in steps for call in step.calls]
    future = [(layer, e) for layer, experts, _ in calls for e in experts] if policy == "belady" else None
    pool = SlotPool(slots, SlotLayout({}, torch.uint8), torch.device("cpu"))
    cache = ExpertCache(Residency(slots, make_policy(policy, future=future)), pool, _NoFiles(), NullMover(0))
    cache.recycle = rule
    try:
        for layer, experts, tokens in calls:
            with cache.use(layer, experts, tokens=tokens) as lease:
                for _ in lease:
                    pass
        return cache.residency.totals().misses
    finally:
        cache.close()


def describe(steps: list[Step], slots: int, generated: int) -> dict:
    """Decode steps' rows and experts (all layers, and per layer), and the floor on loads per token."""
    decode = [step for step in steps if step.kind == "decode"]
    per_layer: dict[int, list[int]] = {}
    for step in decode:
        for layer, experts, _ in step.calls:
            per_layer.setdefault(layer, []).append(len(experts))
    return {"steps": len(steps), "decode_steps": len(decode),
            "rows_per_decode_step": sum(step.calls[0][2] for step in decode) / max(1, len(decode)),
            "experts_per_decode_step": sum(step.asked for step in decode) / max(1, len(decode)),
            "experts_per_layer": [sum(v) / len(v) for _, v in sorted(per_layer.items())],
            "floor_per_token": sum(max(0, step.asked - slots) for step in steps) / generated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per request")
    parser.add_argument("--resident", default="0.25", help="comma-separated shares of all experts in slots")
    parser.add_argument("--policies", default="lru,lfu,fifo,random,forecast,belady")
    parser.add_argument("--synthetic", choices=sorted(SHAPES), help="a synthetic checkpoint of this shape")
    parser.add_argument("--layers", type=int, default=2, help="layers of the synthetic checkpoint")
    parser.add_argument("--folder", type=Path, help="where the synthetic checkpoint is (written once)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    path = served_checkpoint(args.synthetic, args.layers, args.folder)
    total = total_experts(path)
    shares = [float(x) for x in args.resident.split(",")]
    policies = args.policies.split(",")
    model, tokenizer = load_with_tokenizer(path, cache_experts=expert_capacity(shares[0], total), dtype="float32",
                                           progress=False)
    recordings = {}
    try:
        for batch in (int(b) for b in args.batches.split(",")):
            recordings[batch] = record(model, tokenizer, batch, args.tokens)
    finally:
        model.offload.close()
    results = []
    for share in shares:
        slots = expert_capacity(share, total)
        for batch, (steps, generated) in recordings.items():
            row = {"batch": batch, "slots": slots, "experts": total, "tokens": generated,
                   **describe(steps, slots, generated), "loads_per_token": {}}
            for policy in policies:
                for rule in (False, True):
                    name = policy if rule else f"{policy}:off"
                    row["loads_per_token"][name] = replay(steps, policy, slots, rule) / generated
            results.append(row)
    print_table(str(path), results, policies)
    if args.json:
        args.json.write_text(json.dumps({"model": str(path), "tokens_per_request": args.tokens, "rows": results},
                                        indent=2))


def print_table(model: str, rows: list[dict], policies: list[str]) -> None:
    print(f"\n{model}: expert loads per generated token (misses; no prefetch), ':off' without the rule for steps of "
          "several tokens\n")
    names = [f"{p}{s}" for p in policies for s in (":off", "")]
    print("| slots | batch | rows/step | experts/step | per layer | floor | " + " | ".join(names) + " |")
    print("|---:|---:|---:|---:|---|---:|" + "---:|" * len(names))
    for r in rows:
        layers = " ".join(f"{x:.1f}" for x in r["experts_per_layer"])
        print(f"| {r['slots']} of {r['experts']} | {r['batch']} | {r['rows_per_decode_step']:.2f} "
              f"| {r['experts_per_decode_step']:.1f} | {layers} | {r['floor_per_token']:.2f} | "
              + " | ".join(f"{r['loads_per_token'][n]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
