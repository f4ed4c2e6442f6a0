"""Replaying a routing trace through one cache: the reference engine (the runtime's own cache) and the fast one.

``replay`` drives the runtime's own ``ExpertCache`` and ``Prefetcher`` with a ``NullMover`` (``engine="reference"``):
that is the definition of what a replay counts. ``engine="fast"`` (``profiling.compiled``) is the same
bookkeeping over arrays, compiled with numba when it is installed, held equal to the reference counter by
counter and layer by layer by tests/test_replay_engines.py. ``predictions`` lists what a predictor names at
each token and layer (``transition`` as the online predictor would, ``gate`` read from the trace, which keeps
what the gate predictor named while it was recorded, ``hybrid`` the two pooled). A trace file is replayed in
pieces, in bounded memory, with the same counts (``replay_in_pieces``, ``profiling.chunked``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache import ExpertCache, Residency, SlotLayout, SlotPool
from ..errors import BudgetError, ConfigError
from ..experts import use_layer
from ..policies import BUILT_IN, POLICIES, Belady, EvictionPolicy, make_policy, reads_tokens
from ..prefetch import HybridPredictor, Predictor, Prefetcher, TransitionPredictor, pooled_row
from ..traces import Trace, TraceFile
from ..transfer import NullMover
from ..values import PREDICTORS
from .chunked import CHUNK_TOKENS, NextUses, Piece, Window, checked_chunk_tokens, scan
from .compiled import (COUNTERS, EVICTIONS, ISSUED, POLICY_CODES, USED, ReplayState, TraceArrays, TransitionGuesses,
                       compiled_replay, mt_state, transition_guesses)

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
    # model layer -> (evictions of its experts, prefetches issued for it, prefetched experts it used); JSON only
    per_layer_flow: dict[int, tuple[int, int, int]] | None = None

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


def checked_predictor(trace: Trace | TraceFile, predictor: str, margin: int) -> str:
    """``predictor`` in lower case, once it is known that ``trace`` can replay it with ``margin``."""
    predictor = predictor.lower()
    if predictor not in PREDICTORS:
        raise ConfigError(f"predictor={predictor!r} cannot be replayed; use one of {', '.join(PREDICTORS)}")
    if margin < 0:
        raise ConfigError(f"margin={margin} must be 0 or more")
    if predictor in ("gate", "hybrid"):
        if trace.prediction_margin is None or trace.metadata.get("predicted_by") != "gate":
            raise ConfigError(f"this trace stores no gate predictions, so {predictor!r} cannot be replayed; record the "
                              "trace with `offload-moe trace record` (it keeps them), or profile 'transition' instead")
        if margin > trace.prediction_margin:
            raise ConfigError(f"the trace's gate predictions name top_k + {trace.prediction_margin} experts; "
                              f"margin={margin} needs more: re-record with --margin {margin} or ask for less")
    return predictor


def predictions(trace: Trace, predictor: str, margin: int = 1) -> list[list[list[int]]] | None:
    """What ``predictor`` names one layer ahead at each token and layer: ``[T][L-1][<= k + margin]``, best first.

    ``none`` gives None. ``transition`` learns online from the trace's own routing; ``gate`` needs
    the predictions stored in the trace (``offload-moe trace record`` keeps them).
    """
    predictor = checked_predictor(trace, predictor, margin)
    if predictor == "none":
        return None
    width = trace.top_k + margin
    named = []  # one [T][L-1][<= width] per predictor pooled
    if predictor in ("gate", "hybrid"):
        named.append(trace.predicted[:, :-1, :width].long().tolist())
    if predictor in ("transition", "hybrid"):  # the fast engine's guesses: the online predictor's, token by token
        # sized by the largest expert id routed: an expert never routed to has no evidence, so it is never named
        named.append(transition_guesses(trace.experts.numpy(), int(trace.experts.max()) + 1, width).tolist())
    if len(named) == 1:
        return [[[e for e in row if e >= 0] for row in token] for token in named[0]]
    return [[pooled_row([[e for e in row if e >= 0] for row in rows]) for rows in zip(*token_rows)]
            for token_rows in zip(*named)]


def replay(trace: Trace | TraceFile | str | Path, policy: str, capacity: int, *, predictor: str = "none",
           margin: int = 1, seed: int = 0, engine: str = "reference", readers: int = 0, arrays: TraceArrays | None = None,
           chunk_tokens: int = CHUNK_TOKENS) -> ReplayResult:
    """Replay ``trace`` through a cache of ``capacity`` expert slots run by ``policy``, with ``predictor`` prefetching.

    ``engine="reference"`` drives the runtime's own ``ExpertCache``, ``Prefetcher`` and predictors, one
    token and layer at a time through ``experts.use_layer`` (what every MoE layer of a live model calls),
    with a ``NullMover`` that moves no bytes: its counts are the runtime's by construction. ``readers``
    (reference only) runs that mover's empty loads on reader threads, as a live model's reads run.
    ``engine="fast"`` counts the same (``profiling.compiled``), for sweeps; ``arrays``
    (``TraceArrays(trace)``) keeps what it works out once per trace when one trace is replayed many
    times. A policy registered at run time has no compiled form: it replays with the reference under either
    engine.

    A trace file (a path, or ``TraceFile.open(path)``) is read ``chunk_tokens`` rows at a time
    (``replay_in_pieces``): memory holds one piece, and the counts are those of the whole trace.
    """
    if not isinstance(trace, Trace):
        source = trace if isinstance(trace, TraceFile) else TraceFile.open(trace)
        return replay_in_pieces(source, [(policy, capacity, predictor)], margin=margin, seed=seed, engine=engine,
                                readers=readers, chunk_tokens=chunk_tokens)[0]
    policy, predictor = checked_replay(trace, policy, capacity, predictor, margin, engine)
    if engine == "fast" and _compiled(policy):
        arrays = arrays if arrays is not None else TraceArrays(trace)
        counts = compiled_replay(arrays, policy, replay_slots(trace, capacity), predictor, margin, seed)  # [L, 5]
        return _result(trace, policy, capacity, predictor, counts)
    return _reference_replay(trace, policy, capacity, predictor, margin, seed, readers)


def checked_replay(trace: Trace | TraceFile, policy: str, capacity: int, predictor: str, margin: int,
                   engine: str) -> tuple[str, str]:
    """``(policy, predictor)`` in lower case, once it is known that ``trace`` can be replayed so."""
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not a replay engine; use one of {', '.join(ENGINES)}")
    if capacity < trace.top_k:
        raise BudgetError(f"capacity={capacity} is below the trace's top_k={trace.top_k}: a layer could not hold its experts")
    policy, predictor = policy.lower(), checked_predictor(trace, predictor, margin)
    if policy not in POLICIES:
        raise ConfigError(f"unknown eviction policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    if policy == "belady" and predictor != "none":
        raise ConfigError("Belady's optimum is defined without prefetch; replay it with predictor='none'")
    return policy, predictor


def _compiled(policy: str) -> bool:
    """Whether the fast engine has ``policy`` compiled: the standard policies, not one registered over them."""
    return policy in POLICY_CODES and POLICIES.get(policy) is BUILT_IN.get(policy, ())


def _result(trace: Trace | TraceFile, policy: str, capacity: int, predictor: str, counts: np.ndarray) -> ReplayResult:
    """A ``ReplayResult`` from counters [L, 5] (``compiled.COUNTERS``) by layer position."""
    total = dict(zip(COUNTERS, counts.sum(0).tolist()))
    rows = counts.tolist()
    per_layer = {layer: (row[0], row[1]) for layer, row in zip(trace.layers, rows) if row[0] + row[1]}
    flow = {layer: (row[EVICTIONS], row[ISSUED], row[USED]) for layer, row in zip(trace.layers, rows)
            if row[EVICTIONS] or row[ISSUED] or row[USED]}
    return ReplayResult(policy, capacity, predictor, total["hits"] + total["misses"], total["hits"], total["misses"],
                        total["evictions"], total["prefetch_issued"], total["prefetch_used"], per_layer=per_layer,
                        per_layer_flow=flow)


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


def replay_predictor(trace: Trace | TraceFile, predictor: str, margin: int = 1, *,
                     num_experts: int | None = None) -> Predictor:
    """The live predictor called ``predictor`` as a replay of ``trace`` feeds it: ``transition`` learns from the
    trace's routing, ``gate`` reads the trace's recorded guesses, ``hybrid`` pools the two. ``num_experts``:
    what the transition counts are sized by (at least the largest expert id routed plus one; a ``TraceFile``
    needs it); by default the largest id routed plus one."""
    predictor = checked_predictor(trace, predictor, margin)
    if predictor == "none":
        return Predictor()
    gate = RecordedGatePredictor(trace.top_k + margin)
    # sized by the largest expert id routed, not the metadata's num_experts: an expert never routed to
    # has no evidence, so it is never named, and the counts stay as large as the data
    num_experts = num_experts if num_experts is not None else int(trace.experts.max()) + 1
    transition = TransitionPredictor(len(trace.layers), num_experts, trace.top_k, margin)
    return {"gate": gate, "transition": transition, "hybrid": HybridPredictor(gate, transition)}[predictor]


class _NoFiles:
    """The store of a replay's cache: no file is ever read (the mover moves no bytes)."""

    maps = None

    def describe(self, layer: int, expert: int) -> str:
        return "no file (a replay reads no bytes)"

    def close(self) -> None:
        pass


def replay_slots(trace: Trace | TraceFile, capacity: int) -> int:
    """Slots a replay needs: slots beyond the keys the trace can ever admit stay empty and change no count,
    so none are made (a capacity of 50% of a huge num_experts costs no memory)."""
    row = trace.top_k + (trace.top_k + trace.prediction_margin if trace.prediction_margin is not None else 0)
    return min(capacity, trace.num_tokens * len(trace.layers) * row)


def replay_cache(slots: int, policy: EvictionPolicy, readers: int = 0) -> ExpertCache:
    """An ``ExpertCache`` of ``slots`` zero-byte slots run by ``policy``, with a ``NullMover`` (``readers``: its
    reader threads)."""
    return ExpertCache(Residency(slots, policy), SlotPool(slots, _NO_BYTES, torch.device("cpu")), _NoFiles(),
                       NullMover(readers))


_NO_BYTES = SlotLayout({}, torch.uint8)


def _nothing(expert: int, tensors: dict) -> None:
    pass


def drive(trace: Trace, cache: ExpertCache, prefetcher: Prefetcher | None) -> np.ndarray:
    """Run ``trace`` through ``cache`` and ``prefetcher`` as a live model decodes it, one token at a time: at each
    layer the prefetcher predicts (``gate`` from the recorded guesses), then ``experts.use_layer``; then wait
    for the loads still in flight. Returns [L, 2] by layer position: the prefetches issued for it (a replay's
    predictors look one layer ahead, so those the layer before started) and the prefetched experts it used."""
    flow = np.zeros((len(trace.layers), 2), dtype=np.int64)
    drive_tokens(trace, cache, prefetcher, flow)
    cache.drain()
    return flow


def drive_tokens(trace: Trace, cache: ExpertCache, prefetcher: Prefetcher | None, flow: np.ndarray) -> None:
    """``drive`` without the wait at the end, adding to ``flow`` [L, 2]: a trace fed in pieces is driven piece
    after piece through one cache and prefetcher, and drained once, after the last."""
    routing = trace.experts.long()  # [T, L, k], in the router's order, as the live layer hands it on
    recorded = trace.predicted.long().numpy() if trace.predicted is not None and prefetcher is not None else None
    experts = [[sorted(set(chosen)) for chosen in token] for token in routing.tolist()]
    layers = trace.layers
    policy = cache.residency.policy
    tell = policy.on_tokens if reads_tokens(policy) else None  # token-forecast: each step's token, as the runtime does
    ids = trace.token_ids.tolist() if trace.token_ids is not None and tell is not None else None
    for token in range(trace.num_tokens):
        if tell is not None:
            tell(None if ids is None else [ids[token]])
        rows = routing[token]
        for pos, layer in enumerate(layers):
            predicted = prefetcher.predict_device(pos, recorded[token]) if recorded is not None else {}
            issued, used = cache.flow.prefetch_issued, cache.flow.prefetch_used
            use_layer(cache, prefetcher, layer, pos, experts[token][pos], rows[pos : pos + 1], predicted, _nothing)
            if cache.flow.prefetch_issued > issued:
                flow[pos + 1, 0] += cache.flow.prefetch_issued - issued
            flow[pos, 1] += cache.flow.prefetch_used - used


def _reference_replay(trace: Trace, policy: str, capacity: int, predictor: str, margin: int, seed: int,
                      readers: int) -> ReplayResult:
    predictor_ = replay_predictor(trace, predictor, margin)
    future = [key for group in layer_groups(trace) for key in group] if policy == "belady" else None
    cache = replay_cache(replay_slots(trace, capacity), make_policy(policy, seed=seed, future=future), readers)
    prefetcher = Prefetcher(predictor_, trace.layers, cache) if predictor != "none" else None
    try:
        counts = cache_counts(cache, trace.layers, drive(trace, cache, prefetcher))
    finally:
        cache.close()
    return _result(trace, policy, capacity, predictor, counts)


def cache_counts(cache: ExpertCache, layers: list[int], flow: np.ndarray) -> np.ndarray:
    """Counters [L, 5] (``compiled.COUNTERS``) by layer position: the cache's hits, misses and evictions per layer,
    and ``flow`` [L, 2] (``drive``'s prefetches issued and used)."""
    counts = np.zeros((len(layers), len(COUNTERS)), dtype=np.int64)
    for pos, layer in enumerate(layers):
        c = cache.residency.per_layer.get(layer)
        if c is not None:
            counts[pos, :3] = (c.hits, c.misses, c.evictions)
    counts[:, ISSUED:] = flow
    return counts


# ---------------------------------------------------------------- a trace file, in pieces


def replay_in_pieces(source: TraceFile, jobs: Sequence[tuple[str, int, str]], *, margin: int = 1, seed: int = 0,
                     engine: str = "reference", readers: int = 0, chunk_tokens: int = CHUNK_TOKENS,
                     scratch: str | Path | None = None) -> list[ReplayResult]:
    """Replay the trace file ``source`` once for each ``(policy, capacity, predictor)`` of ``jobs``, reading it
    ``chunk_tokens`` rows at a time (``profiling.chunked``). The replays advance together, piece by piece, each
    with its own cache, policy and predictor carried from one piece to the next, so each counts what
    ``replay`` counts on the whole trace in memory. Belady's next uses are worked out first, in a backward
    pass into a temporary file, in a folder made in ``scratch`` (default: the system's temporary folder; a sweep's
    processes are given their parent's, which the parent removes also when it ends them mid-replay, where their
    own cleanup never runs). ``engine``, ``seed``, ``readers``: as ``replay``'s."""
    checked_chunk_tokens(chunk_tokens)
    checked = [(*checked_replay(source, policy, capacity, predictor, margin, engine), capacity)
               for policy, capacity, predictor in jobs]  # (policy, predictor, capacity)
    belady = any(policy == "belady" for policy, _, _ in checked)
    fast_transition = any(engine == "fast" and _compiled(policy) and predictor in ("transition", "hybrid")
                          for policy, predictor, _ in checked)
    gate = any(predictor in ("gate", "hybrid") for _, predictor, _ in checked)
    tokens = any(reads_tokens(POLICIES[policy]) for policy, _, _ in checked if policy in POLICIES)
    wanted = (("predicted",) if gate else ()) + (("token_ids",) if tokens else ())
    width = source.top_k + margin
    with tempfile.TemporaryDirectory(prefix="offload-moe-replay-", dir=scratch) as folder:
        next_file = Path(folder) / "next-uses.int64" if belady else None
        num_experts, requests = scan(source, chunk_tokens, next_file)
        replays: list[_FastReplay | _ReferenceReplay] = []
        try:
            for policy, predictor, capacity in checked:
                kind = _FastReplay if engine == "fast" and _compiled(policy) else _ReferenceReplay
                replays.append(kind(source, policy, capacity, predictor, margin, seed, readers, num_experts, requests))
            transition = TransitionGuesses(len(source.layers), num_experts, width) if fast_transition else None
            with open(next_file, "rb") if belady else nullcontext() as uses:
                next_uses = NextUses(uses, requests) if belady else None
                position = 0
                for trace in source.pieces(chunk_tokens, tensors=wanted):
                    piece = Piece(trace, num_experts, width, position, gate=gate, transition=transition,
                                  next_uses=next_uses)
                    for r in replays:
                        r.feed(piece)
                    position += len(piece.keys)
            return [r.result() for r in replays]
        finally:
            for r in replays:
                r.close()


class _FastReplay:
    """One replay in pieces on the fast engine: ``compiled.ReplayState`` fed each piece."""

    def __init__(self, source: TraceFile, policy: str, capacity: int, predictor: str, margin: int, seed: int,
                 readers: int, num_experts: int, requests: int):
        self.source, self.policy, self.capacity, self.predictor = source, policy, capacity, predictor
        self.gate, self.transition = predictor in ("gate", "hybrid"), predictor in ("transition", "hybrid")
        width = (source.top_k + margin) * (self.gate + self.transition)
        mt, index = mt_state(seed) if policy == "random" else (np.zeros(624, dtype=np.int64), 624)
        self.state = ReplayState(len(source.layers), num_experts, replay_slots(source, capacity), POLICY_CODES[policy],
                                 width, mt, index)

    def feed(self, piece: Piece) -> None:
        self.state.feed(piece.keys, piece.starts, piece.gate if self.gate else piece.none,
                        piece.transition if self.transition else piece.none, piece.following)

    def result(self) -> ReplayResult:
        return _result(self.source, self.policy, self.capacity, self.predictor, self.state.counts)

    def close(self) -> None:
        pass


class _ReferenceReplay:
    """One replay in pieces on the reference engine: one ``ExpertCache``, ``Prefetcher`` and predictor driven
    through each piece (``drive_tokens``), drained after the last. Belady reads its future through windows
    onto the piece at hand."""

    def __init__(self, source: TraceFile, policy: str, capacity: int, predictor: str, margin: int, seed: int,
                 readers: int, num_experts: int, requests: int):
        self.source, self.policy, self.capacity, self.predictor = source, policy, capacity, predictor
        self.num_experts = num_experts
        self.windows = (Window(requests), Window(requests)) if policy == "belady" else None
        rule = Belady(*self.windows) if self.windows is not None else make_policy(policy, seed=seed)
        self.cache = replay_cache(replay_slots(source, capacity), rule, readers)
        live = replay_predictor(source, predictor, margin, num_experts=num_experts)
        self.prefetcher = Prefetcher(live, source.layers, self.cache) if predictor != "none" else None
        self.flow = np.zeros((len(source.layers), 2), dtype=np.int64)  # [L, 2], as drive returns it

    def feed(self, piece: Piece) -> None:
        if self.windows is not None:
            piece.window(*self.windows, self.source.layers, self.num_experts)
        drive_tokens(piece.trace, self.cache, self.prefetcher, self.flow)

    def result(self) -> ReplayResult:
        self.cache.drain()
        counts = cache_counts(self.cache, self.source.layers, self.flow)
        return _result(self.source, self.policy, self.capacity, self.predictor, counts)

    def close(self) -> None:
        self.cache.close()
