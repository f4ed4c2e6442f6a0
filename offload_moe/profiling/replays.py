"""Replaying a routing trace through one cache: the reference engine (the runtime's own cache) and the fast one.

``replay`` drives the runtime's own ``ExpertCache`` and ``Prefetcher`` with a ``NullMover`` (``engine="reference"``);
``engine="fast"`` is the same ``Residency`` bookkeeping written out, without tensors: at each (token, layer) the
layer requests its experts (pinned while it runs), misses are admitted, and a predictor may then prefetch the
next layer's experts into unpinned slots. Predictions are worked out once per trace, before the replays
(``predictions``): ``transition`` by ``transition_predictions`` (what the online predictor would name, token by
token), ``gate`` read from the trace, which keeps what the gate predictor named while it was recorded, and
``hybrid`` the two pooled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..cache import ExpertCache, Residency, SlotLayout, SlotPool
from ..errors import BudgetError, ConfigError
from ..experts import use_layer
from ..policies import make_policy
from ..prefetch import (HybridPredictor, Predictor, Prefetcher, TransitionPredictor, pooled_row,
                        transition_predictions)
from ..traces import Trace
from ..transfer import NullMover
from ..values import PREDICTORS

ENGINES = ("reference", "fast")


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
    per_layer: dict[int, tuple[int, int]] | None = None  # model layer -> (hits, misses); in the JSON, not the CSV

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def loads(self) -> int:
        """Experts moved into the cache: misses plus prefetches (each costs one expert's bytes)."""
        return self.misses + self.prefetch_issued

    @property
    def prefetch_precision(self) -> float | None:
        return self.prefetch_used / self.prefetch_issued if self.prefetch_issued else None

    @property
    def misses_over_belady(self) -> float | None:
        """This policy's misses divided by Belady's at the same capacity (1.0 is optimal)."""
        if self.belady_misses is None:
            return None
        return self.misses / self.belady_misses if self.belady_misses else float(self.misses == 0) or float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "loads": self.loads,
                "prefetch_precision": self.prefetch_precision, "misses_over_belady": self.misses_over_belady}


def layer_groups(trace: Trace) -> list[list[tuple[int, int]]]:
    """The trace as the runtime requests it: one sorted group of (layer, expert) keys per (token, layer)."""
    layers = trace.layers
    rows = trace.experts.long().tolist()  # [T][L][k]
    return [[(layers[pos], e) for e in sorted(set(chosen))] for token in rows for pos, chosen in enumerate(token)]


def _checked_predictor(trace: Trace, predictor: str, margin: int) -> str:
    """``predictor`` in lower case, once it is known that ``trace`` can replay it with ``margin``."""
    predictor = predictor.lower()
    if predictor not in PREDICTORS:
        raise ConfigError(f"predictor={predictor!r} cannot be replayed; use one of {', '.join(PREDICTORS)}")
    if margin < 0:
        raise ConfigError(f"margin={margin} must be 0 or more")
    if predictor in ("gate", "hybrid"):
        if trace.predicted is None or trace.metadata.get("predicted_by") != "gate":
            raise ConfigError(f"this trace stores no gate predictions, so {predictor!r} cannot be replayed; record the "
                              "trace with `offload-moe trace record` (it keeps them), or profile 'transition' instead")
        if margin > trace.prediction_margin:
            raise ConfigError(f"the trace's gate predictions name top_k + {trace.prediction_margin} experts; "
                              f"margin={margin} needs more: re-record with --margin {margin} or ask for less")
    return predictor


def predictions(trace: Trace, predictor: str, margin: int = 1, *,
                _transition: list | None = None) -> list[list[list[int]]] | None:
    """What ``predictor`` names one layer ahead at each token and layer: ``[T][L-1][<= k + margin]``, best first.

    ``none`` gives None. ``transition`` learns online from the trace's own routing; ``gate`` needs
    the predictions stored in the trace (``offload-moe trace record`` keeps them).
    """
    predictor = _checked_predictor(trace, predictor, margin)
    if predictor == "none":
        return None
    width = trace.top_k + margin
    named = []  # one [T][L-1][<= width] per predictor pooled
    if predictor in ("gate", "hybrid"):
        named.append(trace.predicted[:, :-1, :width].long().tolist())
    if predictor in ("transition", "hybrid"):
        if _transition is None:  # the experts in the router's order, as the runtime's predictor sees them
            # sized by the largest expert id routed, not the metadata's num_experts: an expert never
            # routed to has no evidence, so it is never named, and the arrays stay as large as the data
            seen = int(trace.experts.max()) + 1
            _transition = transition_predictions(trace.experts.numpy(), seen, width).tolist()
        named.append(_transition)
    if len(named) == 1:
        return [[[e for e in row if e >= 0] for row in token] for token in named[0]]
    return [[pooled_row([[e for e in row if e >= 0] for row in rows]) for rows in zip(*token_rows)]
            for token_rows in zip(*named)]


def replay(trace: Trace, policy: str, capacity: int, *, predictor: str = "none", margin: int = 1, seed: int = 0,
           engine: str = "reference", readers: int = 0, groups: list[list[tuple[int, int]]] | None = None,
           predicted: list[list[list[int]]] | None = None) -> ReplayResult:
    """Replay ``trace`` through a cache of ``capacity`` expert slots run by ``policy``, with ``predictor`` prefetching.

    ``engine="reference"`` drives the runtime's own ``ExpertCache``, ``Prefetcher`` and predictors, one
    token and layer at a time through ``experts.use_layer`` (what every MoE layer of a live model calls),
    with a ``NullMover`` that moves no bytes: its counts are the runtime's by construction. ``readers``
    (reference only) runs that mover's empty loads on reader threads, as a live model's reads run.
    ``engine="fast"`` is the same bookkeeping written out as a plain loop over ``Residency``, for
    sweeps; ``groups`` and ``predicted`` (from ``layer_groups`` and ``predictions``) can be passed to it
    when replaying one trace many times.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not a replay engine; use one of {', '.join(ENGINES)}")
    if capacity < trace.top_k:
        raise BudgetError(f"capacity={capacity} is below the trace's top_k={trace.top_k}: a layer could not hold its experts")
    if policy.lower() == "belady" and predictor != "none":
        raise ConfigError("Belady's optimum is defined without prefetch; replay it with predictor='none'")
    if engine == "fast":
        return _fast_replay(trace, policy, capacity, predictor=predictor, margin=margin, seed=seed, groups=groups,
                            predicted=predicted)
    return _reference_replay(trace, policy.lower(), capacity, predictor.lower(), margin, seed, readers)


class RecordedGatePredictor(Predictor):
    """The ``gate`` predictor of a replay: it names what the live gate named when the trace was recorded.

    A replay has no hidden states; what a token brings to ``predict_device`` is its row of the trace's
    ``predicted`` [L, m] (a numpy array, best first, -1 padded), and the predictor hands on the row of
    layer ``pos``, as the live one hands on its top-m [T, m].
    """

    name = "gate"

    def __init__(self, width: int):
        self.width = width

    def predict_device(self, pos: int, hidden: np.ndarray) -> dict[int, np.ndarray]:
        if pos + 1 >= len(hidden):
            return {}
        row = hidden[pos, : self.width]
        row = row[row >= 0]
        return {pos + 1: row[None]} if row.size else {}


def replay_predictor(trace: Trace, predictor: str, margin: int = 1) -> Predictor:
    """The live predictor called ``predictor`` as a replay of ``trace`` feeds it: ``transition`` learns from the
    trace's routing, ``gate`` reads the trace's recorded guesses, ``hybrid`` pools the two."""
    predictor = _checked_predictor(trace, predictor, margin)
    if predictor == "none":
        return Predictor()
    gate = RecordedGatePredictor(trace.top_k + margin)
    # sized by the largest expert id routed, not the metadata's num_experts: an expert never routed to
    # has no evidence, so it is never named, and the counts stay as large as the data
    transition = TransitionPredictor(len(trace.layers), int(trace.experts.max()) + 1, trace.top_k, margin)
    return {"gate": gate, "transition": transition, "hybrid": HybridPredictor(gate, transition)}[predictor]


class _NoFiles:
    """The store of a replay's cache: no file is ever read (the mover moves no bytes)."""

    maps = None

    def describe(self, layer: int, expert: int) -> str:
        return "no file (a replay reads no bytes)"

    def close(self) -> None:
        pass


def _slots(trace: Trace, capacity: int) -> int:
    """Slots a replay needs: slots beyond the keys the trace can ever admit stay empty and change no count,
    so none are made (a capacity of 50% of a huge num_experts costs no memory)."""
    admissible = trace.experts.numel() + (trace.predicted.numel() if trace.predicted is not None else 0)
    return min(capacity, admissible)


def _replay_cache(trace: Trace, policy: str, capacity: int, seed: int, readers: int,
                  future: list[tuple[int, int]] | None) -> ExpertCache:
    """An ``ExpertCache`` of zero-byte slots with a ``NullMover``."""
    slots = _slots(trace, capacity)
    residency = Residency(slots, make_policy(policy, seed=seed, future=future))
    return ExpertCache(residency, SlotPool(slots, _NO_BYTES, torch.device("cpu")), _NoFiles(), NullMover(readers))


_NO_BYTES = SlotLayout({}, torch.uint8)


def _nothing(expert: int, tensors: dict) -> None:
    pass


def drive(trace: Trace, cache: ExpertCache, prefetcher: Prefetcher | None) -> None:
    """Run ``trace`` through ``cache`` and ``prefetcher`` as a live model decodes it, one token at a time: at each
    layer the prefetcher predicts (``gate`` from the recorded guesses), then ``experts.use_layer``; then wait
    for the loads still in flight."""
    routing = trace.experts.long()  # [T, L, k], in the router's order, as the live layer hands it on
    recorded = trace.predicted.long().numpy() if trace.predicted is not None and prefetcher is not None else None
    experts = [[sorted(set(chosen)) for chosen in token] for token in routing.tolist()]
    layers = trace.layers
    for token in range(trace.num_tokens):
        rows = routing[token]
        for pos, layer in enumerate(layers):
            predicted = prefetcher.predict_device(pos, recorded[token]) if recorded is not None else {}
            use_layer(cache, prefetcher, layer, pos, experts[token][pos], rows[pos : pos + 1], predicted, _nothing)
    cache.drain()


def _reference_replay(trace: Trace, policy: str, capacity: int, predictor: str, margin: int, seed: int,
                      readers: int) -> ReplayResult:
    predictor_ = replay_predictor(trace, predictor, margin)
    future = [key for group in layer_groups(trace) for key in group] if policy == "belady" else None
    cache = _replay_cache(trace, policy, capacity, seed, readers, future)
    prefetcher = Prefetcher(predictor_, trace.layers, cache) if predictor != "none" else None
    try:
        drive(trace, cache, prefetcher)
        total = cache.residency.totals()
        per_layer = {layer: (c.hits, c.misses) for layer, c in sorted(cache.residency.per_layer.items())}
        flow = cache.flow
    finally:
        cache.close()
    return ReplayResult(policy, capacity, predictor, total.hits + total.misses, total.hits, total.misses,
                        total.evictions, flow.prefetch_issued, flow.prefetch_used, per_layer=per_layer)


def _fast_replay(trace: Trace, policy: str, capacity: int, *, predictor: str = "none", margin: int = 1,
                 seed: int = 0, groups: list[list[tuple[int, int]]] | None = None,
                 predicted: list[list[list[int]]] | None = None) -> ReplayResult:
    """``replay(engine="fast")``: the cache's bookkeeping written out over ``Residency`` alone, checked equal to
    the reference by tests/test_profiling.py."""
    if predicted is None:
        predicted = predictions(trace, predictor, margin)
    groups = groups if groups is not None else layer_groups(trace)
    future = [key for group in groups for key in group] if policy.lower() == "belady" else None
    table = Residency(_slots(trace, capacity), make_policy(policy, seed=seed, future=future))
    prefetched: set[tuple[int, int]] = set()
    flying: list[tuple[int, int]] = []  # prefetched keys still pinned as in flight, until the next layer starts
    issued = used = 0
    layers = trace.layers
    num_layers = len(layers)
    request, admit, release_all = table.request, table.admit, table.release_all
    for i, group in enumerate(groups):
        if flying:  # as the runtime: a prefetch landed by the time the next layer runs is evictable again
            release_all(flying)
            flying = []
        hits, misses = request(group)
        if prefetched:
            for key, _ in hits:
                if key in prefetched:
                    prefetched.discard(key)
                    used += 1
        for key in misses:
            evicted = admit(key)[1]
            if prefetched:
                prefetched.discard(evicted)
        token, pos = divmod(i, num_layers)
        guesses = predicted[token][pos] if predicted is not None and pos < num_layers - 1 else ()
        # as the runtime: the guesses are started while the layer runs, and retried once it is done
        for layer_done in (False, True) if guesses else (True,):
            if layer_done:
                release_all(group)
            for expert in guesses:
                key = (layers[pos + 1], expert)
                if key in table:
                    continue
                if not table.free and len(table.pins) >= len(table.slot_of):
                    break  # every slot is pinned: the rest wait for the retry
                _, evicted = admit(key)
                prefetched.discard(evicted)
                prefetched.add(key)
                flying.append(key)
                issued += 1
    total = table.totals()
    per_layer = {layer: (c.hits, c.misses) for layer, c in sorted(table.per_layer.items())}
    return ReplayResult(policy.lower(), capacity, predictor, total.hits + total.misses, total.hits, total.misses,
                        total.evictions, issued, used, per_layer=per_layer)
