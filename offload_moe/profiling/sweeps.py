"""Sweeps: every policy x capacity x predictor replayed, plus Belady's optimum at each capacity, in one process,
spread over spawned ones, or run as tasks on Ray (an optional dependency: ``pip install 'offload_moe[cluster]'``)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..errors import BudgetError, ConfigError, OffloadMoEError
from ..policies import BUILT_IN, POLICIES
from ..traces import Trace, TraceFile
from .chunked import CHUNK_TOKENS, checked_chunk_tokens
from .compiled import TraceArrays
from .replays import ENGINES, ReplayResult, checked_predictor, replay, replay_in_pieces


def sweep(trace: Trace | TraceFile | str | Path, *, policies: Sequence[str], capacities: Sequence[int],
          predictors: Sequence[str] = ("none",), margin: int = 1, progress: Callable[[int], None] | None = None,
          workers: int = 1, engine: str = "fast", ray: bool | str = False,
          chunk_tokens: int = CHUNK_TOKENS) -> list[ReplayResult]:
    """Every policy x capacity x predictor, plus Belady at each capacity; each result knows Belady's misses.

    ``engine`` is ``replay``'s: ``fast`` by default (compiled with numba when it is installed; the reference,
    which drives the real cache, takes hundreds of times as long), with the same counts.

    ``progress(1)`` is called after each replay; there are ``sweep_size(...)`` of them. With ``workers``
    above 1 the replays run in that many processes (``default_workers`` suggests a number); they are
    started with spawn, so a script that calls this needs an ``if __name__ == "__main__":`` guard.

    A trace file (a path, or ``TraceFile.open(path)``) is read ``chunk_tokens`` rows at a time and the replays
    advance through it together (``replay_in_pieces``), so memory holds one piece however long the trace;
    with ``workers`` (or Ray) each process takes a share of the replays and reads the file itself, so the
    path must be readable where they run. The results are those of the trace in memory.
    """
    if isinstance(trace, (str, Path)):
        trace = TraceFile.open(trace)
    in_pieces = isinstance(trace, TraceFile)
    if in_pieces:
        checked_chunk_tokens(chunk_tokens)
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not a replay engine; use one of {', '.join(ENGINES)}")
    unknown = [p for p in policies if p.lower() not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policies {', '.join(unknown)}; known: {', '.join(sorted(POLICIES))}")
    small = [c for c in capacities if c < trace.top_k]
    if small:
        raise BudgetError(f"capacity {small[0]} is below the trace's top_k={trace.top_k}: a layer could not hold its experts")
    named = list(dict.fromkeys(x.lower() for x in predictors))
    # the reference engine reads the trace itself; a file is read in pieces by each replay's process
    arrays = TraceArrays(trace) if engine == "fast" and not in_pieces else None
    for predictor in named:  # checked, and the fast engine's guesses worked out once, before any replay
        checked = checked_predictor(trace, predictor, margin)
        if arrays is not None:
            arrays.guesses(checked, margin)
    jobs = []  # (policy, capacity, predictor)
    for capacity in capacities:
        jobs.append(("belady", capacity, "none"))
        jobs += [(policy, capacity, predictor) for policy in policies if policy.lower() != "belady" for predictor in named]
    custom = [p for p in policies if POLICIES[p.lower()] is not BUILT_IN.get(p.lower())]
    # what a task replays: one job, or with a file a share of them, which read the file together
    shares = min(workers, len(jobs)) if in_pieces and (workers > 1 and not custom or ray not in (False, None)) else 1
    batches = [list(range(i, len(jobs), shares)) for i in range(shares)] if in_pieces else [[i] for i in range(len(jobs))]
    tasks = [[jobs[i] for i in batch] for batch in batches]
    if ray is not False and ray is not None:
        if ray == "":
            raise ConfigError("the Ray address is empty; give a cluster's address (auto, ray://head:10001), "
                              "or ray=True (--ray) for a local Ray")
        if custom:
            raise ConfigError(f"policy {custom[0]!r} was added at run time, so Ray's workers, which import offload_moe "
                              "afresh, do not know it; sweep it without ray, or register it in a module they import")
        done = _sweep_on_ray(trace, arrays, tasks, margin, workers, progress, engine, ray, chunk_tokens)
    elif workers > 1 and not custom:  # a policy added at run time does not exist in a freshly spawned process
        done = _sweep_in_processes(trace, arrays, tasks, margin, workers, progress, engine, chunk_tokens)
    else:
        _start_worker(trace, arrays)
        done = []
        try:
            for task in tasks:
                done.append(_replay_jobs(task, margin, engine, chunk_tokens))
                if progress is not None:
                    progress(len(task))
        finally:
            _WORKER.clear()
    results = [None] * len(jobs)
    for batch, replays in zip(batches, done, strict=True):
        for i, result in zip(batch, replays, strict=True):
            results[i] = result
    by_capacity = {r.capacity: r.misses for r in results if r.policy == "belady"}
    return [ReplayResult(**{**asdict(r), "belady_misses": by_capacity[r.capacity]}) for r in results]


# A sweep can spread its replays over processes; each process gets the trace and what the fast engine
# worked out from it (``TraceArrays``: the requests as keys, the predictors' guesses) once, when it starts,
# and keeps them here.
_WORKER: dict = {}
# Expert requests over all replays above which processes pay for their start: a spawned process imports torch
# and loads the compiled engine (seconds), where the compiled engine replays millions of requests a second.
_PARALLEL_REQUESTS = 200_000_000


def _start_worker(trace: Trace | TraceFile, arrays: TraceArrays | None) -> None:
    _WORKER.update(trace=trace, arrays=arrays)


def _replay_jobs(jobs: list[tuple[str, int, str]], margin: int, engine: str, chunk_tokens: int) -> list[ReplayResult]:
    """The replays ``jobs`` of the worker's trace: one after another, or, of a file, together in one pass."""
    trace, arrays = _WORKER["trace"], _WORKER["arrays"]
    if isinstance(trace, TraceFile):
        return replay_in_pieces(trace, jobs, margin=margin, engine=engine, chunk_tokens=chunk_tokens,
                                scratch=_WORKER.get("scratch"))
    return [replay(trace, policy, capacity, predictor=predictor, margin=margin, engine=engine, arrays=arrays)
            for policy, capacity, predictor in jobs]


def default_workers(trace: Trace | TraceFile, replays: int) -> int:
    """One process per CPU when ``replays`` replays of ``trace`` are enough work to pay for starting them, else 1."""
    cpus = _cpus()
    requests = trace.num_tokens * len(trace.layers) * trace.top_k * replays
    return min(cpus, replays) if requests >= _PARALLEL_REQUESTS else 1


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _sweep_in_processes(trace: Trace | TraceFile, arrays: TraceArrays | None, tasks: list, margin: int, workers: int,
                        progress: Callable[[int], None] | None, engine: str, chunk_tokens: int) -> list[list[ReplayResult]]:
    """The replays in ``workers`` spawned processes.

    Ctrl-C reaches the whole process group. The workers ignore it from their first instruction (they are
    spawned while the parent ignores it, and SIG_IGN survives exec); the parent stops them and raises
    KeyboardInterrupt at once (the CLI exits 130). The trace goes to the workers through a temporary file,
    so spawning them is quick and the parent ignores Ctrl-C only for those milliseconds.
    """
    with tempfile.TemporaryDirectory(prefix="offload-moe-sweep-") as folder:
        shared = Path(folder) / "trace.pickle"
        shared.write_bytes(pickle.dumps((trace, arrays), protocol=pickle.HIGHEST_PROTOCOL))
        # spawn, not fork: a forked child of a process that has run torch's thread pools can hang
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker_process, initargs=(str(shared),))
        try:
            with _ctrl_c_ignored():  # the processes are spawned by submit
                futures = {pool.submit(_replay_jobs, task, margin, engine, chunk_tokens): len(task) for task in tasks}
            for future in as_completed(futures):
                if progress is not None:
                    progress(futures[future])
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _start_worker(*pickle.loads(Path(shared).read_bytes()))  # our own file, written by _sweep_in_processes
    # the replays' temporary files go into the parent's folder: it ends this process without warning (Ctrl-C,
    # another replay's error), so the cleanup of a folder of its own would never run
    _WORKER["scratch"] = str(Path(shared).parent)


@contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """SIGINT ignored inside (in the main thread; elsewhere nothing changes), so processes spawned here
    start with it ignored."""
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


def _sweep_on_ray(trace: Trace | TraceFile, arrays: TraceArrays | None, tasks: list, margin: int, workers: int,
                  progress: Callable[[int], None] | None, engine: str, address: bool | str,
                  chunk_tokens: int) -> list[list[ReplayResult]]:
    """Each of ``tasks`` (one replay, or a share of a file's) a Ray task. The trace (or the ``TraceFile``, which
    the workers read themselves) and the predictions are put into the object store once; a task is handed
    their reference inside a list, so Ray does not resolve it per task, and a worker reads them at its first
    task and keeps them (``_WORKER``) for the next ones."""
    try:
        import ray
    except ImportError:
        raise ConfigError("sweeping on Ray needs Ray: pip install 'offload_moe[cluster]' (or pip install ray)") from None
    started = not ray.is_initialized()
    if started:
        _start_ray(ray, address, workers)
    try:
        shared = ray.put((trace, arrays))
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_replay_job)
        futures = [task.remote([shared], jobs, margin, engine, chunk_tokens) for jobs in tasks]
        sizes = {future.hex(): len(jobs) for future, jobs in zip(futures, tasks)}
        pending = list(futures)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # a failed replay raises here, before the others are waited for
                if progress is not None:
                    progress(sum(sizes[f.hex()] for f in done))
            return ray.get(futures)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, OffloadMoEError) else None
            raise cause or OffloadMoEError(f"a replay failed on Ray: {e.cause!r}") from None
        finally:
            for future in pending:  # Ctrl-C or a failure: the replays not yet done are not waited for
                ray.cancel(future, force=True)
    finally:
        if started:
            ray.shutdown()


def _start_ray(ray, address: bool | str, workers: int) -> None:
    """A local Ray of ``workers`` CPUs (``address`` True), or a connection to the cluster at ``address``."""
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address is True:
        ray.init(num_cpus=workers if workers > 1 else _cpus(), **quiet)
        return
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"could not connect to Ray at {address!r} ({e}); start a cluster (`ray start --head`) and "
                          "give its address, or ask for a local Ray (--ray without an address)") from None


def _ray_replay_job(shared: list, jobs: list[tuple[str, int, str]], margin: int, engine: str,
                    chunk_tokens: int) -> list[ReplayResult]:
    """One replay in a Ray worker; the worker reads the trace from the object store at its first task of a sweep."""
    import ray

    (reference,) = shared
    if _WORKER.get("shared") != reference.hex():
        _WORKER.clear()
        _start_worker(*ray.get(reference))
        _WORKER["shared"] = reference.hex()
    return _replay_jobs(jobs, margin, engine, chunk_tokens)


def default_predictors(trace: Trace | TraceFile, margin: int = 1) -> list[str]:
    """``none`` and ``transition``, plus ``gate`` and ``hybrid`` when the trace keeps the gate's guesses
    with at least ``margin`` beyond top_k."""
    stored = trace.prediction_margin is not None and trace.prediction_margin >= margin
    return ["none", "transition"] + (["gate", "hybrid"] if stored else [])


def sweep_size(policies: Sequence[str], capacities: Sequence[int], predictors: Sequence[str]) -> int:
    """How many replays ``sweep`` runs."""
    others = len([p for p in policies if p.lower() != "belady"])
    return len(capacities) * (1 + others * len(dict.fromkeys(p.lower() for p in predictors)))
