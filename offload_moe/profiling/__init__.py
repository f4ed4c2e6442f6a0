"""Cache-policy profiling: replay a routing trace through eviction policies, capacities and predictors.

One module a concern:

- ``replays``: one replay (``replay``): the reference engine drives the runtime's own ``ExpertCache`` and
  ``Prefetcher`` with a ``NullMover``; the predictions a replay prefetches (``predictions``, ``replay_predictor``);
  a trace file read in pieces, in bounded memory (``replay_in_pieces``);
- ``chunked``: what the replays in pieces share: the passes over the pieces (the largest expert id, Belady's
  next uses into a temporary file) and each piece's requests and guesses;
- ``compiled``: the fast engine, the same bookkeeping over arrays, compiled with numba when it is installed
  (``TraceArrays``: what it works out once per trace);
- ``sweeps``: every policy x capacity x predictor plus Belady's optimum, the bound every policy is
  measured against (``sweep``), in one process or several;
- ``inputs``: what ``offload-moe profile`` replays: the trace (``trace_to_profile``) and the capacities;
- ``results``: ``results.json``, ``results.csv`` and the plots (``write_results``).

Import the names from here:

    trace = load_trace("profiles/traces/demo-heldout.safetensors")
    results = sweep(trace, policies=["lru", "lfu"], capacities=[16, 32], predictors=["none", "transition"])
    write_results(results, trace, "profile-out")
"""

from .chunked import CHUNK_TOKENS
from .compiled import TraceArrays
from .inputs import parse_capacities, profile_capacities, recording_device, reference_trace_path, trace_to_profile
from .replays import (
    ENGINES,
    RecordedGatePredictor,
    ReplayResult,
    drive,
    layer_groups,
    predictions,
    replay,
    replay_in_pieces,
    replay_predictor,
)
from .results import HEATMAP_MAX_EXPERTS, HEATMAP_MAX_LAYERS, activation_counts, write_results
from .sweeps import default_predictors, default_workers, sweep, sweep_size

__all__ = [
    "CHUNK_TOKENS", "ENGINES", "HEATMAP_MAX_EXPERTS", "HEATMAP_MAX_LAYERS", "RecordedGatePredictor", "ReplayResult", "TraceArrays",
    "activation_counts", "default_predictors", "default_workers", "drive", "layer_groups", "parse_capacities",
    "predictions", "profile_capacities", "recording_device", "reference_trace_path", "replay", "replay_in_pieces",
    "replay_predictor",
    "sweep", "sweep_size", "trace_to_profile", "write_results",
]
