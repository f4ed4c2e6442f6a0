"""Which eviction policy comes closest to Belady's optimum? A benchmark (issue 19, part 5).

Replays the bundled model's reference trace and synthetic traces (other skews, localities, layer counts,
top-k) through the reference engine (the runtime's own cache) at 12.5%, 25% and 50% of the experts,
without prefetch and with ``transition`` (and, on the bundled trace, ``gate``) prefetch, and reports each
policy's hit rate as a share of Belady's, and with prefetch the hit rate against the loads moved.

Besides the registered policies it tries candidates that did not earn a place in offload_moe/policies/
(defined below, registered only for this run): LRFU, per-layer quotas, a LeCaR-style LRU/LFU mix. With
``--foresight`` it adds what no online policy can have: ``forecast`` told each key's exact next request
when it falls within the next layer, the rest of the token running, the next token or two tokens, which bounds
what a predictor of that reach could add.

``--live`` decodes the reference trace's held-out text through the bundled model (teacher forced, one
token at a time) with 12.5% and 25% of its experts cached, once per policy, and reports the runtime's own hit rates.

    python benchmarks/policies.py                      # table, and results/policies.json
    python benchmarks/policies.py --foresight --live --json out.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import platform
import time
from collections import OrderedDict
from pathlib import Path

import torch

import offload_moe
from offload_moe.policies import POLICIES, EvictionPolicy, Forecast
from offload_moe.policies.heap import LazyHeap
from offload_moe.profiling import layer_groups, reference_trace_path, replay
from offload_moe.traces import Trace, load_trace, synthesize_trace

FRACTIONS = (0.125, 0.25, 0.5)
SYNTHETIC = {  # name -> synthesize_trace settings (tokens set by --tokens)
    "L8-E16-k2 skew1 loc.3": dict(layers=8, num_experts=16, top_k=2, skew=1.0, locality=0.3),
    "L8-E32-k4 skew.5 loc.5": dict(layers=8, num_experts=32, top_k=4, skew=0.5, locality=0.5),
    "L16-E8-k2 skew1.5 loc.1": dict(layers=16, num_experts=8, top_k=2, skew=1.5, locality=0.1),
    "L6-E16-k2 skew0 loc.3": dict(layers=6, num_experts=16, top_k=2, skew=0.0, locality=0.3),
    "L4-E64-k8 skew1 loc0": dict(layers=4, num_experts=64, top_k=8, skew=1.0, locality=0.0),
}


# -- candidates that lost (see BENCHMARKS.md); registered for this run only ---------------------------------

class LRFU(EvictionPolicy):
    """Lee et al.'s LRFU: each request adds 1 to a key's score, which halves every ``half_life`` requests;
    the lowest score goes (half_life -> 0 is LRU, -> infinity LFU)."""

    name = "lrfu"

    def __init__(self, half_life: float = 64.0) -> None:
        self.log_gain = math.log(2.0) / half_life
        self.tick = 0
        self.rank: dict = {}  # key -> (log of its score, scaled to the present tick,)
        self.heap = LazyHeap(self.rank, self.name)

    def on_access(self, key) -> None:
        self.tick += 1
        now = self.tick * self.log_gain  # scores kept as log(sum 2^(t_i / h)): order never changes with time
        old = self.rank.get(key, (-math.inf,))[0]
        self.rank[key] = (now + math.log1p(math.exp(old - now)) if old > -math.inf else now,)
        if key in self.heap.resident:
            self.heap.push(key)

    def on_insert(self, key) -> None:
        self.rank.setdefault(key, (-math.inf,))
        self.heap.add(key)

    def on_evict(self, key) -> None:
        self.heap.discard(key)

    def victim(self, pinned):
        return self.heap.lowest_unpinned(pinned)


class LayerQuotaLFU(EvictionPolicy):
    """Per-layer quotas: each layer may keep an equal share of the slots seen so far; a layer over its share
    gives up its least frequently requested key (LFU within the layer, across layers when none is over)."""

    name = "quota-lfu"

    def __init__(self) -> None:
        self.counts: dict = {}
        self.by_layer: dict = {}  # layer -> set of resident keys

    def on_access(self, key) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def on_insert(self, key) -> None:
        self.by_layer.setdefault(key[0], set()).add(key)

    def on_evict(self, key) -> None:
        self.by_layer.get(key[0], set()).discard(key)

    def victim(self, pinned):
        resident = sum(len(s) for s in self.by_layer.values())
        share = resident / max(len(self.by_layer), 1)
        over = [s for s in self.by_layer.values() if len(s) > share and any(k not in pinned for k in s)]
        pool = [k for s in (over or self.by_layer.values()) for k in s if k not in pinned]
        return min(pool, key=lambda k: self.counts.get(k, 0))


class LeCaR(EvictionPolicy):
    """Vietri et al.'s LeCaR: LRU and LFU experts, weighted by regret. A key evicted by one and requested again
    while still in that expert's history lowers its weight; the victim is drawn by the weights (seeded)."""

    name = "lecar"

    def __init__(self, seed: int = 0, rate: float = 0.45) -> None:
        import random

        self.rng = random.Random(seed)
        self.rate = rate
        self.weights = [0.5, 0.5]  # LRU, LFU
        self.order: OrderedDict = OrderedDict()
        self.counts: dict = {}
        self.history: list[OrderedDict] = [OrderedDict(), OrderedDict()]
        self.tick = 0

    def on_access(self, key) -> None:
        self.tick += 1
        self.counts[key] = self.counts.get(key, 0) + 1
        for i, history in enumerate(self.history):
            evicted_at = history.pop(key, None)
            if evicted_at is not None:  # expert i evicted it wrongly: trust it less
                self.weights[i] *= math.exp(-self.rate * 0.005 ** ((self.tick - evicted_at) / max(len(self.order), 1)))
                total = sum(self.weights)
                self.weights = [w / total for w in self.weights]
        if key in self.order:
            self.order.move_to_end(key)

    def on_insert(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def on_evict(self, key) -> None:
        self.order.pop(key, None)

    def victim(self, pinned):
        candidates = [k for k in self.order if k not in pinned]
        lru = candidates[0]
        lfu = min(candidates, key=lambda k: self.counts.get(k, 0))
        chosen = 0 if self.rng.random() < self.weights[0] else 1
        history = self.history[chosen]
        history[[lru, lfu][chosen]] = self.tick
        while len(history) > max(len(self.order), 1):
            history.popitem(last=False)
        return [lru, lfu][chosen]


class Foresight(Forecast):
    """``forecast`` told each key's exact next request when it falls within ``horizon`` layer steps (None: within
    the token running now): not a policy (it reads the future), a bound on what a predictor of that reach could add."""

    def __init__(self, groups: list, horizon: int | None) -> None:
        super().__init__()
        self.horizon, self.position = horizon or 0, -1
        self.to_token_end = horizon is None
        self.uses: dict = {}
        for i, group in enumerate(groups):
            for key in group:
                self.uses.setdefault(key, []).append(i)
        self.current = None

    def on_access(self, key) -> None:
        if key[0] != self.current:
            self.current, self.position = key[0], self.position + 1
        super().on_access(key)

    def victim(self, pinned):
        period = len(self._visited_at) or 1
        if self.to_token_end:  # knows the rest of the token running now: its layers after this one
            self.horizon = period - 1 - self.position % period
        resident = [k for heap in self._heaps.values() for k in heap.resident if k not in pinned]

        def expected(key):
            uses = self.uses.get(key, [])
            j = bisect.bisect_right(uses, self.position)
            if j < len(uses) and uses[j] - self.position <= self.horizon:
                return uses[j] - self.position
            layer = key[0]
            distance = (self._visited_at.get(layer, self._step) + period - self._step - 1) % period + 1
            chance = self._rank[key][0]
            guess = distance + period * (1 - chance) / chance if chance > 0 else math.inf
            return max(guess, self.horizon + 1)

        return max(resident, key=expected)


CANDIDATES = {cls.name: cls for cls in (LRFU, LayerQuotaLFU, LeCaR)}


# -- the measurements ---------------------------------------------------------------------------------------

def traces(tokens: int) -> dict[str, Trace]:
    out = {"bundled (demo-heldout)": load_trace(reference_trace_path())}
    for name, settings in SYNTHETIC.items():
        out[name] = synthesize_trace(tokens=tokens, sequences=4, seed=1, **settings)
    return out


def foresight_hits(trace: Trace, capacity: int, horizon: int | None) -> int:
    """Hits of ``Foresight`` over ``trace``, replayed as any policy is (registered a moment under a name)."""
    groups = layer_groups(trace)

    class Bound(Foresight):
        name = f"foresight-{horizon or 'token'}"

        def __init__(self) -> None:
            super().__init__(groups, horizon)

    POLICIES[Bound.name] = Bound
    try:
        return replay(trace, Bound.name, capacity).hits
    finally:
        del POLICIES[Bound.name]


def measure(trace: Trace, name: str, policies: list[str], foresight: bool) -> list[dict]:
    total = len(trace.layers) * trace.num_experts
    predictors = ["transition"] + (["gate"] if trace.predicted is not None else [])
    rows = []
    for fraction in FRACTIONS:
        capacity = round(fraction * total)
        belady = replay(trace, "belady", capacity)
        base = {"trace": name, "fraction": fraction, "capacity": capacity, "belady_hit_rate": belady.hit_rate}
        for policy in policies:
            for predictor in ["none"] + (predictors if policy in ("lru", "lfu", "forecast", "token-forecast") else []):
                start = time.perf_counter()
                r = replay(trace, policy, capacity, predictor=predictor)
                rows.append({**base, "policy": policy, "predictor": predictor, "hit_rate": r.hit_rate,
                             "of_belady": r.hit_rate / belady.hit_rate, "loads": r.loads, "requests": r.requests,
                             "belady_loads": belady.loads, "seconds": round(time.perf_counter() - start, 2)})
        if foresight:
            for horizon, label in ((1, "next layer"), (None, "rest of token"), (len(trace.layers), "next token"),
                                   (2 * len(trace.layers), "next 2 tokens")):
                hits = foresight_hits(trace, capacity, horizon)
                rows.append({**base, "policy": f"foresight: {label}", "predictor": "none", "hit_rate": hits / belady.requests,
                             "of_belady": hits / belady.hits, "loads": belady.requests - hits,
                             "requests": belady.requests, "belady_loads": belady.loads})
        print(f"  {name} at {fraction:.1%} done", flush=True)
    return rows


def live(trace: Trace, policies: list[str], fraction: float, steps: int) -> list[dict]:
    """Teacher-forced decoding of the trace's held-out text through the bundled model, once per policy."""
    from offload_moe.generation import kv_cache_kwargs, kv_cache_of

    path = offload_moe.demo_model_path()
    total = len(trace.layers) * trace.num_experts
    out = []
    for policy in policies:
        model = offload_moe.load(path, cache_experts=round(fraction * total), policy=policy, dtype="float32",
                                 progress=False)
        start = time.perf_counter()
        with torch.inference_mode():
            for first, end in trace.sequences():
                result = model(trace.token_ids[first : first + 1].long().unsqueeze(0), use_cache=True)
                past = kv_cache_of(result)
                for t in range(first + 1, min(end, first + steps)):
                    result = model(trace.token_ids[t : t + 1].long().unsqueeze(0), **kv_cache_kwargs(model, past),
                                   use_cache=True)
                    past = kv_cache_of(result)
        stats = model.offload.stats()
        model.offload.close()
        out.append({"policy": policy, "fraction": fraction, "hit_rate": stats["hit_rate"], "hits": stats["hits"],
                    "misses": stats["misses"], "tokens": stats["tokens"], "seconds": round(time.perf_counter() - start, 1)})
        print(f"  live {policy}: hit rate {stats['hit_rate']:.3f}", flush=True)
    return out


def print_tables(rows: list[dict], live_rows: list[dict]) -> None:
    print("\nWithout prefetch: hit rate / Belady's (Belady's hit rate in brackets)")
    names = list(dict.fromkeys(r["policy"] for r in rows if r["predictor"] == "none"))
    print(f"{'trace':26s} {'capacity':>14s} " + " ".join(f"{n.replace('foresight: ', 'knows ')[:16]:>16s}" for n in names))
    for (trace, fraction), group in _grouped(rows, ("trace", "fraction")).items():
        by = {r["policy"]: r for r in group if r["predictor"] == "none"}
        print(f"{trace:26s} {fraction:>6.1%} ({by['lru']['belady_hit_rate']:.3f}) "
              + " ".join(f"{by[n]['of_belady']:>16.3f}" if n in by else f"{'':>16s}" for n in names))
    print("\nWith prefetch: hit rate, loads per request (Belady without prefetch: hit rate, loads per request)")
    for (trace, fraction), group in _grouped(rows, ("trace", "fraction")).items():
        cells = [f"{r['policy']}+{r['predictor']} {r['hit_rate']:.3f}/{r['loads'] / r['requests']:.3f}"
                 for r in group if r["predictor"] != "none"]
        belady = group[0]
        print(f"{trace:26s} {fraction:>6.1%} belady {belady['belady_hit_rate']:.3f}/"
              f"{belady['belady_loads'] / belady['requests']:.3f} | " + " | ".join(cells))
    if live_rows:
        print("\nLive (bundled model, teacher-forced decoding of the held-out text):")
        for r in live_rows:
            print(f"  {r['policy']:10s} {r['fraction']:.1%}: hit rate {r['hit_rate']:.3f} ({r['hits']} hits, "
                  f"{r['misses']} misses, {r['tokens']} tokens, {r['seconds']} s)")


def _grouped(rows, fields):
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[f] for f in fields), []).append(r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1000, help="tokens of each synthetic trace")
    parser.add_argument("--policies", default="lru,lfu,forecast,token-forecast,lrfu,quota-lfu,lecar")
    parser.add_argument("--traces", default="", help="comma-separated trace names (default: all)")
    parser.add_argument("--foresight", action="store_true", help="add the bounds of knowing the next layer/token(s)")
    parser.add_argument("--live", action="store_true", help="also decode through the bundled model, each policy live")
    parser.add_argument("--live-steps", type=int, default=512, help="tokens decoded per held-out sequence")
    parser.add_argument("--json", type=Path, default=Path("results/policies.json"))
    args = parser.parse_args()
    POLICIES.update(CANDIDATES)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    chosen = [t.strip() for t in args.traces.split(",") if t.strip()]
    rows = []
    all_traces = traces(args.tokens)
    for name, trace in all_traces.items():
        if not chosen or name in chosen:
            rows += measure(trace, name, policies, args.foresight)
    bundled = all_traces["bundled (demo-heldout)"]
    live_policies = ["lru", "lfu", "forecast", "token-forecast"]
    live_rows = [row for fraction in (0.125, 0.25) for row in live(bundled, live_policies, fraction, args.live_steps)
                 ] if args.live else []
    print_tables(rows, live_rows)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": _cpus(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "offload_moe": offload_moe.__version__},
              "date": time.strftime("%Y-%m-%d %H:%M"), "engine": "reference", "synthetic_tokens": args.tokens,
              "rows": rows, "live": live_rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.json}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
