"""A trace file replayed in pieces, in bounded memory: the passes over its pieces and what each piece gives a replay.

A trace too long for memory is read ``chunk_tokens`` rows at a time (``TraceFile.pieces``). What every replay of a
piece needs is worked out once per piece (``Piece``): the requests as keys, the gate's and the transition
predictor's guesses, and Belady's next uses. Each replay's cache, policy and counters carry from one piece to the
next (``replays.replay_in_pieces``), so the counts are those of the whole trace replayed at once.

Before the replays, one pass over the pieces (``scan``) finds the largest expert id, which the arrays are sized
by, as ``TraceArrays`` sizes them. Belady needs each request's next use, which may lie many pieces ahead: with
Belady among the replays that pass runs backwards, last piece first, carrying each key's first request in the
pieces after (``compiled.next_positions``), and writes the next uses, int64, to a file in a temporary folder
(8 bytes a request on disk, removed with the folder); the replay reads back one piece's slice at a time
(``NextUses``). Memory holds one piece and what is derived from it, plus, per replay, O(layers x experts +
capacity), and the transition predictor's counts [L-1, E, E] once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import ConfigError
from ..traces import Trace, TraceFile
from .compiled import NEVER, TransitionGuesses, next_positions, request_keys

CHUNK_TOKENS = 4096  # rows of a piece: with what is derived from it, 16-30 bytes a request (~50 MB at 48 layers x top-8)


def checked_chunk_tokens(chunk_tokens: int) -> int:
    if chunk_tokens < 1:
        raise ConfigError(f"chunk_tokens={chunk_tokens}: a piece of the trace holds at least one token")
    return chunk_tokens


def scan(source: TraceFile, chunk_tokens: int, next_uses: Path | None = None) -> tuple[int, int]:
    """One pass over ``source``'s pieces: ``(experts, requests)``, the largest expert id routed or guessed plus one,
    and with ``next_uses`` the number of requests (each token and layer's distinct experts; else 0). With
    ``next_uses`` the pass runs last piece first and writes there each request's next use, as ``NextUses`` reads it."""
    layers, highest, requests = len(source.layers), 0, 0
    later = np.full(layers * source.num_experts, NEVER, dtype=np.int64) if next_uses is not None else None
    with open(next_uses, "wb") if next_uses is not None else nullcontext() as out:
        for piece in source.pieces(chunk_tokens, tensors=("predicted",), reverse=later is not None):
            experts = piece.experts.numpy()  # [T, L, k]
            highest = max(highest, int(experts.max()), int(piece.predicted.max()) if piece.predicted is not None else 0)
            if later is None:
                continue
            keys, _ = request_keys(experts, source.num_experts)
            requests += len(keys)
            # positions counted back from the end (the total is known only once the pass is done): -1 is the last
            next_positions(keys, later, offset=-requests).tofile(out)
    return highest + 1, requests


class NextUses:
    """Belady's next uses that ``scan`` wrote, read back a piece at a time, in the order the pieces come."""

    def __init__(self, file: BinaryIO, requests: int):
        self.file, self.requests, self.position = file, requests, 0

    def next(self, count: int) -> np.ndarray:
        """The next ``count`` requests' next uses [count], positions in the whole trace (``NEVER``: none)."""
        # the pass that wrote them went last piece first: this piece's block lies before those of the pieces before it
        self.file.seek((self.requests - self.position - count) * 8)
        following = np.fromfile(self.file, dtype=np.int64, count=count)
        self.position += count
        never = following == NEVER
        following += self.requests
        following[never] = NEVER
        return following


class Window(Sequence):
    """The part of a long sequence one piece holds, indexed by position in the whole sequence: what Belady's
    ``future`` and ``next_after`` are in a reference replay in pieces."""

    def __init__(self, length: int):
        self.length, self.start, self.values = length, 0, []

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position):
        if not self.start <= position < self.start + len(self.values):
            raise IndexError(f"position {position} is outside the piece held ({self.start}..)")
        return self.values[position - self.start]


class Piece:
    """One piece of a trace as every replay of it reads it, worked out once for all the replays of a pass.

    ``keys``, ``starts``: the requests (``compiled.request_keys``) with ``num_experts`` keys a layer; ``gate``
    and ``transition`` [T, L-1, width]: the guesses (empty where not asked for); ``following``: Belady's next
    uses of the requests (empty without ``next_uses``); ``position``: the requests in the pieces before.
    """

    def __init__(self, trace: Trace, num_experts: int, width: int, position: int, *, gate: bool,
                 transition: TransitionGuesses | None, next_uses: NextUses | None):
        tokens, layers = trace.num_tokens, len(trace.layers)
        self.trace, self.position = trace, position
        self.keys, self.starts = request_keys(trace.experts.numpy(), num_experts)  # [N], [T * L + 1]
        self.none = np.empty((tokens, max(layers - 1, 0), 0), dtype=np.int16)
        self.gate = np.ascontiguousarray(trace.predicted.numpy()[:, :-1, :width]) if gate else self.none
        self.transition = transition.next(trace.experts.numpy()) if transition is not None else self.none
        self.following = next_uses.next(len(self.keys)) if next_uses is not None else np.empty(0, dtype=np.int64)
        self._windowed: tuple[list, list] | None = None  # Belady's values, made once for all its replays of the piece

    def window(self, future: Window, next_after: Window, layers: list[int], num_experts: int) -> None:
        """Point Belady's windows at this piece: its requests as the reference's keys, and their next uses."""
        if self._windowed is None:
            self._windowed = ([(layers[key // num_experts], key % num_experts) for key in self.keys.tolist()],
                              [math.inf if f == NEVER else f for f in self.following.tolist()])
        future.start = next_after.start = self.position
        future.values, next_after.values = self._windowed
