"""Synthetic traces: routing with a chosen popularity skew and temporal locality, for profiling without a model."""

from __future__ import annotations

import json

import numpy as np
import torch

from ..errors import TraceError
from .format import MAX_EXPERTS, Trace


def synthesize_trace(*, tokens: int, layers: int, num_experts: int, top_k: int, skew: float = 1.0,
                     locality: float = 0.3, sequences: int = 1, seed: int = 0) -> Trace:
    """A routing trace with controllable popularity skew and temporal locality, for profiling without a model.

    At each layer the experts get Zipf popularities ``1 / rank ** skew`` in a random order per
    layer (``skew=0``: uniform). Each of a token's ``top_k`` choices repeats one of the previous
    token's experts at that layer with probability ``locality``, and is otherwise drawn from
    the popularities; a token's experts are distinct. ``tokens`` are split into ``sequences``
    of near-equal length, and locality does not cross a sequence boundary.
    """
    if min(tokens, layers, num_experts, top_k, sequences) < 1:
        raise TraceError(f"tokens={tokens}, layers={layers}, num_experts={num_experts}, top_k={top_k} and "
                         f"sequences={sequences} must all be at least 1")
    if num_experts > MAX_EXPERTS:
        raise TraceError(f"num_experts={num_experts} is too many: a trace stores expert ids as int16, "
                         f"so at most {MAX_EXPERTS} experts per layer")
    if top_k > num_experts or sequences > tokens:
        raise TraceError(f"top_k={top_k} must not exceed num_experts={num_experts}, nor sequences={sequences} tokens={tokens}")
    if skew < 0 or not 0 <= locality <= 1:
        raise TraceError(f"skew={skew} must be >= 0 and locality={locality} within [0, 1]")

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_experts + 1) ** skew
    popularity = np.stack([rng.permutation(weights) for _ in range(layers)])  # [L, E]
    popularity /= popularity.sum(-1, keepdims=True)
    lengths = [tokens // sequences + (i < tokens % sequences) for i in range(sequences)]
    starts = set(np.cumsum([0, *lengths[:-1]]).tolist())
    out = np.empty((tokens, layers, top_k), dtype=np.int16)
    fresh = _draw_without_replacement(rng, popularity, tokens, top_k)  # [T, L, k], what no repeat would choose
    repeat = rng.random((tokens, layers, top_k)) < locality
    pick = rng.integers(0, top_k, (tokens, layers, top_k))
    for t in range(tokens):
        if t in starts:
            out[t] = fresh[t]
            continue
        for layer in range(layers):
            chosen: list[int] = []
            previous = out[t - 1, layer]
            for j in range(top_k):
                expert = int(previous[pick[t, layer, j]]) if repeat[t, layer, j] else int(fresh[t, layer, j])
                if expert in chosen:  # already taken: the next unused fresh draw, else any unused expert
                    expert = next((int(e) for e in fresh[t, layer] if int(e) not in chosen),
                                  next(e for e in range(num_experts) if e not in chosen))
                chosen.append(expert)
            out[t, layer] = chosen
    metadata = {
        "model": "synthetic",
        "num_experts": str(num_experts),
        "top_k": str(top_k),
        "layers": json.dumps(list(range(layers))),
        "source": f"offload_moe.traces.synthesize_trace(skew={skew}, locality={locality}, seed={seed})",
    }
    trace = Trace(experts=torch.from_numpy(out), metadata=metadata,
                  sequence_lengths=torch.tensor(lengths, dtype=torch.int64))
    trace.validate("synthetic trace")
    return trace


def _draw_without_replacement(rng, popularity, tokens: int, top_k: int):
    """``[T, L, k]`` distinct experts per (token, layer), drawn in order from ``popularity`` [L, E] (Gumbel top-k)."""
    out = np.empty((tokens, popularity.shape[0], top_k), dtype=np.int16)
    chunk = max(1, 2**22 // popularity.size)  # tokens at a time: a few tens of MB of noise, whatever the trace size
    log_popularity = np.log(popularity)[None]
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        keys = log_popularity - np.log(-np.log(rng.random((n, *popularity.shape))))  # [n, L, E], Gumbel-perturbed
        out[start:start + n] = np.argsort(-keys, axis=-1)[..., :top_k]
    return out
