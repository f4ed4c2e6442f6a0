"""Cache-policy profiling: replay a routing trace through eviction policies, capacities and predictors.

The replay drives the same ``Residency`` bookkeeping and the same predictors as the runtime,
without tensors: at each (token, layer) the layer requests its experts (pinned while it
runs), misses are admitted, and a predictor may then prefetch into unpinned slots. Belady's
optimum, given the trace's future, is the bound every policy is measured against.

    trace = load_trace("profiles/traces/demo-heldout.safetensors")
    results = sweep(trace, policies=["lru", "lfu"], capacities=[16, 32], predictors=["none", "transition"])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .cache import Residency
from .errors import BudgetError, ConfigError
from .policies import POLICIES, make_policy
from .prefetch import TransitionPredictor, _ranked
from .traces import Trace

REPLAY_PREDICTORS = ("none", "transition")


@dataclass(frozen=True)
class ReplayResult:
    """Counters of one replay. ``belady_misses`` is filled in by ``sweep`` for the same capacity."""

    policy: str
    capacity: int
    predictor: str
    requests: int
    hits: int
    misses: int
    evictions: int
    prefetch_issued: int = 0
    prefetch_used: int = 0
    belady_misses: int | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def misses_over_belady(self) -> float | None:
        """This policy's misses divided by Belady's at the same capacity (1.0 is optimal)."""
        if self.belady_misses is None:
            return None
        return self.misses / self.belady_misses if self.belady_misses else float(self.misses == 0) or float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "misses_over_belady": self.misses_over_belady}


def layer_groups(trace: Trace) -> list[list[tuple[int, int]]]:
    """The trace as the runtime requests it: one sorted group of (layer, expert) keys per (token, layer)."""
    layers = trace.layers
    rows = trace.experts.long().tolist()  # [T][L][k]
    return [[(layers[pos], e) for e in sorted(set(chosen))] for token in rows for pos, chosen in enumerate(token)]


def replay(trace: Trace, policy: str, capacity: int, *, predictor: str = "none", margin: int = 1,
           depth: int = 1, seed: int = 0, groups: list[list[tuple[int, int]]] | None = None) -> ReplayResult:
    """Replay ``trace`` through a cache of ``capacity`` expert slots run by ``policy``."""
    if capacity < trace.top_k:
        raise BudgetError(f"capacity={capacity} is below the trace's top_k={trace.top_k}: a layer could not hold its experts")
    if predictor not in REPLAY_PREDICTORS:
        raise ConfigError(f"predictor={predictor!r} cannot be replayed from a trace; use one of {', '.join(REPLAY_PREDICTORS)}")
    groups = groups if groups is not None else layer_groups(trace)
    future = [key for group in groups for key in group] if policy.lower() == "belady" else None
    if future is not None and predictor != "none":
        raise ConfigError("Belady's optimum is defined without prefetch; replay it with predictor='none'")
    table = Residency(capacity, make_policy(policy, seed=seed, future=future))
    learner = TransitionPredictor(len(trace.layers), trace.num_experts, trace.top_k, margin, depth) if predictor != "none" else None
    prefetched: set[tuple[int, int]] = set()
    issued = used = 0
    layers = trace.layers
    num_layers, top_k = len(layers), trace.top_k
    for i, group in enumerate(groups):
        hits, misses = table.request(group)
        for key, _ in hits:
            if key in prefetched:
                prefetched.discard(key)
                used += 1
        for key in misses:
            _, evicted = table.admit(key)
            prefetched.discard(evicted)
        for key in group:
            table.release(key)
        if learner is not None:
            pos = i % num_layers
            routing = np.array([[e for _, e in group] + [group[-1][1]] * (top_k - len(group))])  # [1, k]
            learner.observe(pos, routing)
            for ahead, ids in learner.predict_host(pos, routing).items():
                for expert in _ranked(ids):
                    key = (layers[ahead], expert)
                    if key in table:
                        continue
                    if not table.free and len(table.pins) >= len(table):
                        break
                    _, evicted = table.admit(key)
                    prefetched.discard(evicted)
                    table.release(key)
                    prefetched.add(key)
                    issued += 1
    total = table.totals()
    return ReplayResult(policy.lower(), capacity, predictor, total.hits + total.misses, total.hits, total.misses,
                        total.evictions, issued, used)


def sweep(trace: Trace, *, policies: Sequence[str], capacities: Sequence[int],
          predictors: Sequence[str] = ("none",), progress=None) -> list[ReplayResult]:
    """Every policy x capacity x predictor, plus Belady at each capacity; each result knows Belady's misses."""
    unknown = [p for p in policies if p.lower() not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policies {', '.join(unknown)}; known: {', '.join(sorted(POLICIES))}")
    groups = layer_groups(trace)
    results = []
    for capacity in capacities:
        bound = replay(trace, "belady", capacity, groups=groups)
        results.append(bound)
        for policy in (p for p in policies if p.lower() != "belady"):
            for predictor in predictors:
                results.append(replay(trace, policy, capacity, predictor=predictor, groups=groups))
                if progress is not None:
                    progress(1)
    by_capacity = {r.capacity: r.misses for r in results if r.policy == "belady"}
    return [ReplayResult(**{**asdict(r), "belady_misses": by_capacity[r.capacity]}) for r in results]


def activation_counts(trace: Trace) -> torch.Tensor:
    """How often each expert was chosen at each layer: [layers, experts] (for the heatmap)."""
    layers, experts = len(trace.layers), trace.num_experts
    flat = trace.experts.long() + torch.arange(layers).view(1, -1, 1) * experts  # [T, L, k]
    return torch.bincount(flat.reshape(-1), minlength=layers * experts).view(layers, experts)
