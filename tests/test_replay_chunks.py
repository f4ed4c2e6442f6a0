"""Replays of a trace file read in pieces (profiling.replay_in_pieces): the counts of the whole trace in memory,
for every policy, predictor, engine and piece size, in bounded memory."""

from __future__ import annotations

import json
import threading

import numpy as np
import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_moe.errors import ConfigError
from offload_moe.profiling import replay, replay_in_pieces, sweep
from offload_moe.profiling.chunked import scan
from offload_moe.profiling.compiled import NEVER, TraceArrays
from offload_moe.traces import Trace, TraceFile, save_trace, synthesize_trace

POLICIES = ["lru", "lfu", "fifo", "random", "belady", "forecast"]


def guessed_trace(tokens: int = 45, layers: int = 3, experts: int = 6, k: int = 2, seed: int = 0) -> Trace:
    """A synthetic trace with gate guesses stored (top-k + 1, -1 padded at the last layer), in sequences."""
    trace = synthesize_trace(tokens=tokens, layers=layers, num_experts=experts, top_k=k, skew=1.0, locality=0.3,
                             sequences=min(3, tokens), seed=seed)
    g = torch.Generator().manual_seed(seed)
    guesses = torch.stack([torch.randperm(experts, generator=g)[: k + 1] for _ in range(tokens * layers)])
    trace.predicted = guesses.view(tokens, layers, k + 1).to(torch.int16)
    trace.predicted[:, -1] = -1
    trace.metadata["predicted_by"] = "gate"
    return trace


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    trace = guessed_trace()
    return trace, save_trace(trace, tmp_path_factory.mktemp("chunks") / "t.safetensors")


@pytest.mark.parametrize("engine,chunk", [("fast", 1), ("fast", 7), ("fast", 45), ("fast", 1000), ("reference", 1),
                                          ("reference", 7)])  # 7 does not divide 45; 1000 is more than the trace
def test_a_file_in_pieces_counts_what_the_whole_trace_counts(stored, engine, chunk):
    """Every policy without and with prefetch (transition, and the recorded gate guesses), each replay of the file
    equal to the whole trace's, counter by counter and layer by layer; one pass replays them all."""
    trace, path = stored
    jobs = [(policy, capacity, predictor) for policy in POLICIES for capacity in (2, 5)
            for predictor in (["none"] if policy == "belady" else ["none", "transition", "gate", "hybrid"])]
    together = replay_in_pieces(TraceFile.open(path), jobs, engine=engine, seed=3, chunk_tokens=chunk)
    for (policy, capacity, predictor), got in zip(jobs, together, strict=True):
        want = replay(trace, policy, capacity, predictor=predictor, engine=engine, seed=3)
        assert got == want, (policy, capacity, predictor)
    one = replay(path, "lru", 5, predictor="transition", engine=engine, chunk_tokens=chunk)  # one replay of a path
    assert one == together[jobs.index(("lru", 5, "transition"))]


def test_sizes_and_checks_come_from_the_file(stored, tmp_path):
    trace, path = stored
    source = TraceFile.open(path)
    assert (source.num_tokens, source.layers, source.top_k, source.prediction_margin) == (45, [0, 1, 2], 2, 1)
    assert source.first(10).load().experts.equal(trace.experts[:10])
    assert replay(source.first(10), "lfu", 3, engine="fast") == replay(trace.first(10), "lfu", 3, engine="fast")
    with pytest.raises(ConfigError, match="chunk_tokens=0"):
        replay(path, "lru", 4, chunk_tokens=0)
    with pytest.raises(ConfigError, match="Belady's optimum is defined without prefetch"):
        replay(path, "belady", 4, predictor="transition")
    plain = save_trace(synthesize_trace(tokens=9, layers=2, num_experts=4, top_k=1), tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match="stores no gate predictions"):
        replay(plain, "lru", 4, predictor="gate")


def test_the_backward_pass_gives_each_request_its_next_use(stored, tmp_path):
    """The next uses ``scan`` writes, piece by piece backwards, are those worked out on the whole trace."""
    trace, path = stored
    arrays = TraceArrays(trace)
    for chunk in (1, 4, 45):
        out = tmp_path / f"next-{chunk}"
        experts, requests = scan(TraceFile.open(path), chunk, out)
        assert (experts, requests) == (arrays.num_experts, len(arrays.keys))
        written = np.fromfile(out, dtype=np.int64)
        # the file holds the pieces last first, each in order, counted back from the end of the trace
        blocks, start = [], 0
        sizes = [len(TraceArrays(p).keys) for p in TraceFile.open(path).pieces(chunk)]
        for size in reversed(sizes):
            blocks.insert(0, written[start:start + size])
            start += size
        following = np.concatenate(blocks)
        following = np.where(following == NEVER, NEVER, following + requests)
        assert np.array_equal(following, arrays.following())


@given(data=st.data(), engine=st.sampled_from(["fast", "reference"]), policy=st.sampled_from(POLICIES),
       predictor=st.sampled_from(["none", "transition", "gate", "hybrid"]))
@settings(max_examples=40, deadline=None)
def test_any_piece_size_counts_the_same(tmp_path_factory, data, engine, policy, predictor):
    tokens = data.draw(st.integers(1, 30))
    trace = guessed_trace(tokens=tokens, layers=data.draw(st.integers(1, 3)), experts=data.draw(st.integers(2, 6)),
                          k=1, seed=data.draw(st.integers(0, 5)))
    predictor = "none" if policy == "belady" or len(trace.layers) == 1 and predictor != "none" else predictor
    path = save_trace(trace, tmp_path_factory.mktemp("any") / "t.safetensors")
    capacity = data.draw(st.integers(1, len(trace.layers) * trace.num_experts))
    chunk = data.draw(st.integers(1, tokens + 2))
    want = replay(trace, policy, capacity, predictor=predictor, engine=engine, seed=1)
    assert replay(path, policy, capacity, predictor=predictor, engine=engine, seed=1, chunk_tokens=chunk) == want


SWEEP = dict(policies=["lru", "lfu", "random"], capacities=[3, 6], predictors=["none", "transition", "gate"])


def test_a_sweep_of_a_file_is_the_sweep_of_the_trace(stored):
    trace, path = stored
    done = []
    assert sweep(path, chunk_tokens=8, progress=done.append, **SWEEP) == sweep(trace, **SWEEP)
    assert sum(done) == 2 * (1 + 3 * 3)


@pytest.mark.slow  # spawns 2 processes (seconds each); the replays in pieces are the ones tested above
def test_a_sweep_of_a_file_shared_out_over_processes_is_the_sweep_of_the_trace(stored):
    trace, path = stored
    done = []
    assert sweep(TraceFile.open(path), chunk_tokens=8, workers=2, progress=done.append, **SWEEP) == sweep(trace, **SWEEP)
    assert sum(done) == 2 * (1 + 3 * 3)


def test_memory_holds_a_piece_not_the_trace(tmp_path):
    """A trace 12 times the piece bound: the process grows by a few pieces' worth while Belady and LRU with
    transition prefetch replay it together, where the whole trace's arrays alone would take 40 MB and more."""
    tokens, layers, k = 200_000, 4, 4
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(32, generator=g)[:k] for _ in range(4096)])  # distinct top-k rows
    experts = experts[torch.randint(0, 4096, (tokens * layers,), generator=g)].view(tokens, layers, k).to(torch.int16)
    metadata = {"model": "m", "num_experts": "32", "top_k": str(k), "layers": json.dumps(list(range(layers))),
                "source": "t"}
    path = save_trace(Trace(experts=experts, metadata=metadata), tmp_path / "big.safetensors")
    del experts
    source = TraceFile.open(path)
    jobs = [("belady", 32, "none"), ("lru", 32, "transition")]
    replay_in_pieces(source.first(100), jobs, engine="fast", chunk_tokens=16384)  # numba's kernels loaded first
    process = psutil.Process()
    before, peak, stop = process.memory_info().rss, [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = replay_in_pieces(source, jobs, engine="fast", chunk_tokens=16384)
    finally:
        stop.set()
        watcher.join()
    assert all(r.requests == tokens * layers * k for r in results)
    grown = max(peak[0], process.memory_info().rss) - before
    assert grown < 24 * 2**20, f"grew by {grown / 2**20:.1f} MiB replaying a 6 MiB trace in pieces of 16384 tokens"


def test_the_command_replays_a_long_trace_in_pieces(stored, tmp_path):
    """``offload-moe profile --trace FILE --chunk-tokens N``: the same results.json as the trace read whole, also
    with --max-tokens."""
    from typer.testing import CliRunner

    from offload_moe.cli import app

    _, path = stored
    results = {}
    for name, chunk in (("whole", "1000"), ("pieces", "7")):
        out = tmp_path / name
        done = CliRunner().invoke(app, ["profile", "--trace", str(path), "--capacities", "3,6", "--max-tokens", "40",
                                        "--chunk-tokens", chunk, "--out", str(out), "--no-plots"])
        assert done.exit_code == 0, done.output
        document = json.loads((out / "results.json").read_text())
        results[name] = (document["trace"], document["results"])
    assert results["whole"] == results["pieces"] and results["whole"][0]["tokens"] == 40


def test_a_replay_in_pieces_keeps_its_temporary_files_in_the_folder_given(stored, tmp_path, monkeypatch):
    """``scratch``: the folder of Belady's next uses goes there (a sweep's processes are handed their parent's
    folder, which the parent removes even when it ends them mid-replay), and is gone after the replay."""
    import offload_moe.profiling.replays as replays

    _, path = stored
    seen = []

    def watched_scan(source, chunk_tokens, next_uses=None):
        seen.append(next_uses)
        return scan(source, chunk_tokens, next_uses)

    monkeypatch.setattr(replays, "scan", watched_scan)
    replay_in_pieces(TraceFile.open(path), [("belady", 4, "none")], engine="fast", chunk_tokens=8, scratch=tmp_path)
    assert seen[0].parent.parent == tmp_path and not seen[0].parent.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow  # spawns 2 processes (seconds each); the folder handed to a replay is tested above
def test_ctrl_c_during_a_sweep_of_a_file_in_processes_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The processes are ended mid-replay (SIGTERM: nothing of theirs runs after it); the folders their replays made
    for Belady's next uses (8 bytes a request) were in the sweep's own, which goes with them."""
    import os
    import signal
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the spawned processes' temporary folder too
    monkeypatch.setattr(tempfile, "tempdir", None)
    trace = synthesize_trace(tokens=20_000, layers=4, num_experts=8, top_k=2, seed=0)
    path = save_trace(trace, tmp_path / "long.safetensors")
    started, done, raised = threading.Event(), threading.Event(), threading.Event()

    def interrupt_once_a_replay_runs() -> None:
        while not done.is_set():
            if any(temp.rglob("offload-moe-replay-*")):
                started.set()
            if started.is_set():  # again until it lands: the sweep ignores Ctrl-C while it spawns its processes
                os.kill(os.getpid(), signal.SIGINT)
            done.wait(0.01 if not started.is_set() else 0.1)

    def ctrl_c(signum, frame) -> None:  # the first raises; later ones, sent before the watcher stops, do nothing
        if not raised.is_set():
            raised.set()
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, ctrl_c)
    watcher = threading.Thread(target=interrupt_once_a_replay_runs)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            # the reference engine: each replay takes seconds, the Ctrl-C comes within milliseconds of its start
            sweep(path, policies=["lru"], capacities=[4], engine="reference", workers=2, chunk_tokens=4096)
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
    assert started.is_set()
    assert not list(temp.iterdir())
