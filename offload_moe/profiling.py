"""Cache-policy profiling: replay a routing trace through eviction policies, capacities and predictors.

The reference replay (``replay``) drives the runtime's own ``ExpertCache`` and ``Prefetcher`` with a ``NullMover``;
sweeps use the fast engine, the same ``Residency`` bookkeeping written out, without tensors: at each
(token, layer) the layer requests its experts (pinned while it runs), misses are admitted, and
a predictor may then prefetch the next layer's experts into unpinned slots. Predictions are
worked out once per trace, before the replays: ``transition`` by ``transition_predictions``
(what the online predictor would name, token by token), ``gate`` read from the trace, which
keeps what the gate predictor named while it was recorded, and ``hybrid`` the two pooled. Belady's optimum, given the
trace's future, is the bound every policy is measured against.

    trace = load_trace("profiles/traces/demo-heldout.safetensors")
    results = sweep(trace, policies=["lru", "lfu"], capacities=[16, 32], predictors=["none", "transition"])
    write_results(results, trace, "profile-out")
"""

from __future__ import annotations

import csv
import io
import json
import platform
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, UTC
from pathlib import Path

import numpy as np
import torch

from ._version import __version__
from .atomic import atomic_write_all
from .cache import ExpertCache, Residency, SlotLayout, SlotPool
from .errors import BudgetError, ConfigError, OffloadMoEError
from .policies import BUILT_IN, POLICIES, make_policy
from .experts import use_layer
from .hardware import get_profile, profiles_folder
from .planning import plan
from .prefetch import (HybridPredictor, Predictor, Prefetcher, TransitionPredictor, pooled_row,
                       transition_predictions)
from .traces import Trace, load_trace, record_prompts
from .transfer import NullMover
from .values import PREDICTORS

ENGINES = ("reference", "fast")
HEATMAP_MAX_EXPERTS, HEATMAP_MAX_LAYERS = 1024, 512  # beyond, the image is larger than matplotlib draws


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


def sweep(trace: Trace, *, policies: Sequence[str], capacities: Sequence[int], predictors: Sequence[str] = ("none",),
          margin: int = 1, progress: Callable[[int], None] | None = None, workers: int = 1,
          engine: str = "fast") -> list[ReplayResult]:
    """Every policy x capacity x predictor, plus Belady at each capacity; each result knows Belady's misses.

    ``engine`` is ``replay``'s: ``fast`` by default (the reference, which drives the real cache, takes
    about 2.5x as long without prefetch and 10x with it), with the same counts.

    ``progress(1)`` is called after each replay; there are ``sweep_size(...)`` of them. With ``workers``
    above 1 the replays run in that many processes (``default_workers`` suggests a number); they are
    started with spawn, so a script that calls this needs an ``if __name__ == "__main__":`` guard.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not a replay engine; use one of {', '.join(ENGINES)}")
    unknown = [p for p in policies if p.lower() not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policies {', '.join(unknown)}; known: {', '.join(sorted(POLICIES))}")
    small = [c for c in capacities if c < trace.top_k]
    if small:
        raise BudgetError(f"capacity {small[0]} is below the trace's top_k={trace.top_k}: a layer could not hold its experts")
    named: dict[str, list | None] = {}
    transition = None
    for predictor in dict.fromkeys(x.lower() for x in predictors):
        named[predictor] = predictions(trace, predictor, margin, _transition=transition)
        if predictor == "transition":
            transition = named[predictor]
    jobs = []  # (policy, capacity, predictor)
    for capacity in capacities:
        jobs.append(("belady", capacity, "none"))
        jobs += [(policy, capacity, predictor) for policy in policies if policy.lower() != "belady" for predictor in named]
    custom = [p for p in policies if POLICIES[p.lower()] is not BUILT_IN.get(p.lower())]
    if workers > 1 and not custom:  # a policy added at run time does not exist in a freshly spawned process
        results = _sweep_in_processes(trace, named, jobs, margin, workers, progress, engine)
    else:
        _start_worker(trace, named)
        results = []
        try:
            for job in jobs:
                results.append(_replay_job(*job, margin, engine))
                if progress is not None:
                    progress(1)
        finally:
            _WORKER.clear()
    by_capacity = {r.capacity: r.misses for r in results if r.policy == "belady"}
    return [ReplayResult(**{**asdict(r), "belady_misses": by_capacity[r.capacity]}) for r in results]


# A replay is pure Python, so a sweep can spread its replays over processes; each process gets the trace
# and the predictions once, when it starts, and keeps them here.
_WORKER: dict = {}
_PARALLEL_REQUESTS = 4_000_000  # expert requests over all replays above which processes pay for their start


def _start_worker(trace: Trace, named: dict) -> None:
    _WORKER.update(trace=trace, named=named, groups=layer_groups(trace))


def _replay_job(policy: str, capacity: int, predictor: str, margin: int, engine: str = "fast") -> ReplayResult:
    w = _WORKER
    return replay(w["trace"], policy, capacity, predictor=predictor, margin=margin, engine=engine, groups=w["groups"],
                  predicted=w["named"].get(predictor))


def default_workers(trace: Trace, replays: int) -> int:
    """One process per CPU when ``replays`` replays of ``trace`` are enough work to pay for starting them, else 1."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    requests = trace.num_tokens * len(trace.layers) * trace.top_k * replays
    return min(cpus, replays) if requests >= _PARALLEL_REQUESTS else 1


def _sweep_in_processes(trace: Trace, named: dict, jobs: list, margin: int, workers: int,
                        progress: Callable[[int], None] | None, engine: str) -> list[ReplayResult]:
    """The replays in ``workers`` spawned processes.

    Ctrl-C reaches the whole process group. The workers ignore it from their first instruction (they are
    spawned while the parent ignores it, and SIG_IGN survives exec); the parent stops them and raises
    KeyboardInterrupt at once (the CLI exits 130). The trace goes to the workers through a temporary file,
    so spawning them is quick and the parent ignores Ctrl-C only for those milliseconds.
    """
    import multiprocessing
    import pickle
    import tempfile
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    with tempfile.TemporaryDirectory(prefix="offload-moe-sweep-") as folder:
        shared = Path(folder) / "trace.pickle"
        shared.write_bytes(pickle.dumps((trace, named), protocol=pickle.HIGHEST_PROTOCOL))
        # spawn, not fork: a forked child of a process that has run torch's thread pools can hang
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker_process, initargs=(str(shared),))
        try:
            with _ctrl_c_ignored():  # the processes are spawned by submit
                futures = [pool.submit(_replay_job, *job, margin, engine) for job in jobs]
            for _ in as_completed(futures):
                if progress is not None:
                    progress(1)
            return [f.result() for f in futures]
        except BrokenProcessPool:
            raise OffloadMoEError(
                f"the {workers} replay processes stopped before finishing; a script that runs sweep(workers>1) "
                "needs an `if __name__ == \"__main__\":` guard (processes are spawned), or use workers=1"
            ) from None
        except BaseException:  # Ctrl-C, or an error in a replay: the other replays are not waited for
            _stop_pool(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _start_worker_process(shared: str) -> None:
    import pickle
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _start_worker(*pickle.loads(Path(shared).read_bytes()))  # our own file, written by _sweep_in_processes


@contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """SIGINT ignored inside (in the main thread; elsewhere nothing changes), so processes spawned here
    start with it ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_pool(pool) -> None:
    """Cancel the queued replays and end the running ones now, rather than wait for them."""
    processes = list((pool._processes or {}).values())  # no public call ends a ProcessPoolExecutor's workers
    for process in processes:
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def default_predictors(trace: Trace, margin: int = 1) -> list[str]:
    """``none`` and ``transition``, plus ``gate`` and ``hybrid`` when the trace keeps the gate's guesses
    with at least ``margin`` beyond top_k."""
    stored = trace.predicted is not None and trace.prediction_margin >= margin
    return ["none", "transition"] + (["gate", "hybrid"] if stored else [])


def sweep_size(policies: Sequence[str], capacities: Sequence[int], predictors: Sequence[str]) -> int:
    """How many replays ``sweep`` runs."""
    others = len([p for p in policies if p.lower() != "belady"])
    return len(capacities) * (1 + others * len(dict.fromkeys(p.lower() for p in predictors)))


def reference_trace_path() -> Path:
    """The bundled model's held-out routing trace: what ``offload-moe profile`` replays when given no model
    and no trace."""
    return profiles_folder() / "traces" / "demo-heldout.safetensors"


def recording_device(profile: str | None) -> str:
    """Where a profiling run records: the profile's GPU if this machine has one, else the CPU. The profile
    itself only adds a capacity: routing does not depend on budgets, and its host memory is not needed."""
    device = get_profile(profile).device if profile is not None else "cpu"
    return device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


def trace_to_profile(model: str | Path | None = None, *, trace_file: str | Path | None = None,
                     prompts: Sequence[str] | None = None, prompts_file: str | Path | None = None,
                     source: str = "prompts", margin: int = 1, max_new_tokens: int = 0, profile: str | None = None,
                     on_prompt: Callable[[], None] | None = None, trust_remote_code: bool = False) -> Trace:
    """The trace a profiling run replays, chosen as ``offload-moe profile`` chooses it: recorded from
    ``model`` on ``prompts`` (with the gate's top-k + ``margin`` guesses; on ``profile``'s GPU if this machine
    has it), read from ``trace_file``, or, given neither, the bundled model's reference trace.
    ``prompts_file``: the file the prompts come from, when a caller reads it only for a ``model`` (the CLI):
    given without ``model`` it is refused as ``prompts`` is."""
    if model is not None and trace_file is not None:
        raise ConfigError("give MODEL (with --prompts) or --trace FILE, not both")
    if model is None:
        if prompts is not None or prompts_file is not None:
            raise ConfigError("--prompts needs MODEL; to profile the bundled model, pass its folder "
                              "(python -c 'import offload_moe; print(offload_moe.demo_model_path())')")
        return load_trace(trace_file if trace_file is not None else reference_trace_path())
    if prompts is None:
        raise ConfigError("profiling MODEL records a trace first: give --prompts FILE (one prompt per line)")
    return record_prompts(model, list(prompts), source=source, predict_margin=margin, max_new_tokens=max_new_tokens,
                          on_prompt=on_prompt, device=recording_device(profile), trust_remote_code=trust_remote_code)


def profile_capacities(text: str, trace: Trace, *, model: str | Path | None = None, profile: str | None = None,
                       trust_remote_code: bool = False) -> list[int]:
    """The capacities to replay: ``text`` as ``parse_capacities`` reads it, plus, for a ``model`` with a
    hardware ``profile``, the expert slots that profile's device memory gives (``plan``)."""
    total = len(trace.layers) * trace.num_experts
    slots = parse_capacities(text, total)
    if model is not None and profile is not None:
        fitted = plan(model, profile=profile, trust_remote_code=trust_remote_code).expert_slots
        slots = sorted(set(slots) | {min(fitted, total)})
    return slots


def parse_capacities(text: str, total_experts: int) -> list[int]:
    """``"8,16,32"`` (expert slots) or ``"12.5%,25%"`` (of all experts), or a mix, as sorted slot counts."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = round(float(part[:-1]) / 100 * total_experts) if part.endswith("%") else int(part)
        except ValueError:
            raise ConfigError(f"capacity {part!r} is neither a number of expert slots (e.g. 32) "
                              "nor a share of all experts (e.g. 25%)") from None
        if not 1 <= value <= total_experts:
            raise ConfigError(f"capacity {part!r} is {value} slots; it must be between 1 and the trace's "
                              f"{total_experts} experts")
        out.append(value)
    if not out:
        raise ConfigError("no capacities given; e.g. --capacities 12.5%,25%,50% or --capacities 16,32")
    return sorted(set(out))


def activation_counts(trace: Trace) -> torch.Tensor:
    """How often each expert was chosen at each layer: [layers, experts] (for the heatmap)."""
    layers, experts = len(trace.layers), trace.num_experts
    flat = trace.experts.long() + torch.arange(layers).view(1, -1, 1) * experts  # [T, L, k]
    return torch.bincount(flat.reshape(-1), minlength=layers * experts).view(layers, experts)


# ---------------------------------------------------------------- results on disk


def write_results(results: Sequence[ReplayResult], trace: Trace, out: str | Path, *, seconds: float | None = None,
                  plots: bool = True) -> dict[str, Path | str]:
    """Write ``results.json`` and ``results.csv`` into ``out``, and the PNG plots when matplotlib is there, as one
    set: if any file cannot be written, none of them changes.

    Returns the paths written by name; ``"plots"`` (matplotlib missing) or ``"heatmap"`` (too many experts
    or layers to draw) holds a message instead.
    """
    out = Path(out)
    total = len(trace.layers) * trace.num_experts
    rows = [{**r.as_dict(), "capacity_share": r.capacity / total} for r in results]
    document = {
        "trace": {**trace.metadata, "tokens": trace.num_tokens, "accesses": trace.num_tokens * len(trace.layers)},
        "results": rows,
        "seconds": seconds,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "offload_moe": __version__, "torch": torch.__version__},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    columns = [f.name for f in fields(ReplayResult) if f.name != "per_layer"] + [
        "hit_rate", "loads", "prefetch_precision", "misses_over_belady", "capacity_share"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    files = {"json": ("results.json", json.dumps(document, indent=2).encode()),
             "csv": ("results.csv", text.getvalue().encode())}
    notes: dict[str, str] = {}
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            notes["plots"] = "matplotlib is not installed, so no plots were drawn: pip install 'offload_moe[plot]'"
        else:
            files["hit_rate_plot"] = ("hit_rate.png", _png(_hit_rate_figure(results, trace)))
            files["tradeoff_plot"] = ("tradeoff.png", _tradeoff_png(results, trace))
            if trace.num_experts <= HEATMAP_MAX_EXPERTS and len(trace.layers) <= HEATMAP_MAX_LAYERS:
                files["heatmap"] = ("activations.png", _heatmap_png(trace))
            else:
                notes["heatmap"] = (f"not drawn: {len(trace.layers)} layers x {trace.num_experts} experts is more than a "
                                    f"heatmap shows (at most {HEATMAP_MAX_LAYERS} x {HEATMAP_MAX_EXPERTS})")
    # one set: a failure (a full disk) leaves the previous results, never results.json without results.csv
    paths = atomic_write_all({out / name: content for name, content in files.values()})
    return {**dict(zip(files, paths, strict=True)), **notes}


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _figure(size: tuple[float, float], panels: int = 1):
    """A matplotlib figure and its axes (a list of ``panels`` when more than one), made without pyplot:
    no global backend or state is touched."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    axes = figure.subplots(1, panels)
    return figure, (list(axes) if panels > 1 else axes)


def _hit_rate_figure(results: Sequence[ReplayResult], trace: Trace):
    """Hit rate against capacity: a panel per predictor, a line per policy, Belady's optimum in each as the bound;
    one legend beside the panels, so no entry covers a line."""
    from matplotlib.figure import Figure

    total = len(trace.layers) * trace.num_experts
    predictors = list(dict.fromkeys(r.predictor for r in results if r.policy != "belady")) or ["none"]
    policies = list(dict.fromkeys(r.policy for r in results if r.policy != "belady"))
    columns = min(2, len(predictors))
    rows = -(-len(predictors) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    belady = sorted((r.capacity, r.hit_rate) for r in results if r.policy == "belady")
    for ax, predictor in zip(grid.flat, predictors):
        if belady:
            ax.plot([100 * c / total for c, _ in belady], [h for _, h in belady], color="black", linewidth=2,
                    linestyle="--", label="Belady (optimum, no prefetch)")
        for i, policy in enumerate(policies):
            points = sorted((r.capacity, r.hit_rate) for r in results if (r.policy, r.predictor) == (policy, predictor))
            ax.plot([100 * c / total for c, _ in points], [h for _, h in points], color=f"C{i}", marker="o",
                    label=policy)
        ax.set_title("no prefetch" if predictor == "none" else f"prefetch: {predictor}", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in grid.flat[len(predictors):]:
        ax.set_visible(False)
    for ax in grid[-1]:
        ax.set_xlabel(f"capacity (% of {total} experts)")
    for ax in grid[:, 0]:
        ax.set_ylabel("hit rate")
    figure.suptitle(f"{trace.metadata['model']}: {trace.num_tokens} tokens x {len(trace.layers)} layers, "
                    f"top-{trace.top_k}")
    handles, labels = grid.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize=8)
    return figure


def _tradeoff_png(results: Sequence[ReplayResult], trace: Trace) -> bytes:
    """Hit rate against experts moved per token, a panel per capacity: what prefetch buys and what it costs."""
    capacities = sorted({r.capacity for r in results})
    figure, axes = _figure((4 * len(capacities), 4), panels=len(capacities))
    axes = axes if len(capacities) > 1 else [axes]
    policies = list(dict.fromkeys(r.policy for r in results if r.policy != "belady"))
    markers = {"none": "o", "transition": "s", "gate": "^", "hybrid": "D"}
    total = len(trace.layers) * trace.num_experts
    for ax, capacity in zip(axes, capacities, strict=True):
        for r in (r for r in results if r.capacity == capacity):
            x = r.loads / max(trace.num_tokens, 1)
            if r.policy == "belady":
                ax.axhline(r.hit_rate, color="black", linestyle="--", linewidth=1)
                ax.plot([x], [r.hit_rate], marker="*", color="black", markersize=12)
                continue
            ax.plot([x], [r.hit_rate], marker=markers.get(r.predictor, "o"), linestyle="none",
                    color=f"C{policies.index(r.policy)}", markersize=7)
        ax.set_title(f"{capacity} slots ({capacity / total:.0%})")
        ax.set_xlabel("experts moved per token")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hit rate")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i}", marker="o", linestyle="none", label=p) for i, p in enumerate(policies)]
    handles += [Line2D([], [], color="grey", marker=m, linestyle="none", label=f"prefetch: {name}")
                for name, m in markers.items() if any(r.predictor == name for r in results)]
    handles.append(Line2D([], [], color="black", marker="*", linestyle="--", label="Belady (no prefetch)"))
    axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panels
    return _png(figure)


def _heatmap_png(trace: Trace) -> bytes:
    """How often each expert was chosen at each layer."""
    from matplotlib.ticker import MaxNLocator

    counts = activation_counts(trace).numpy()
    figure, axes = _figure((max(5, counts.shape[1] / 6), max(3, counts.shape[0] / 4)))
    image = axes.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(trace.layers)), [str(x) for x in trace.layers])
    axes.set_title(f"expert activations ({trace.num_tokens} tokens, top-{trace.top_k})")
    figure.colorbar(image, ax=axes, label="tokens routed")
    return _png(figure)
